"""RCM on the bundled digits: the seed's pipeline at laptop scale, stage by stage.

    python experiments/rcm_digits.py pretrain   [--set key=value ...]
    python experiments/rcm_digits.py finetune   --sigma 0.25 --set model.init_from=<pretrain run id | models:/... | path>
    python experiments/rcm_digits.py tune       --sigma 0.25 [--random] [--space key=spec ...] [--sweep key=value ...]
    python experiments/rcm_digits.py certify    --sigma 0.25 [--set smoothing.n=10000 ...]
    python experiments/rcm_digits.py analyze    RESULTS...
    python experiments/rcm_digits.py quickstart [--set key=value ...]   # pretrain, consistency fine-tune, certify
    python experiments/rcm_digits.py all        [--sigmas 0.25,0.5,1] [--set ...] [--dry-run]   # the whole table
    (pretrain, finetune, tune, certify) --dry-run    # print the resolved config

``finetune`` is the seed's consistency fine-tuning (m = 2, eta = 0.5, lbd = 10 at sigma 0.25 and
20 above) with digits-sized settings: 30 epochs of 10 steps at batch 128, lr 2e-3 scaled by
batch / 256 as the seed scales it, no layer decay, the pretrained final LayerNorm applied (the
seed's ImageNet ``layernorm=True``, as the quickstart), ``c_in`` on the quickstart pretraining's
grid (41 levels). ``certify`` uses n = 1,000 on every 4th test
image. On a cluster: ``ray job submit --working-dir . -- python experiments/rcm_digits.py quickstart``.
"""

from __future__ import annotations

from _rcm_seed import commands, finetune_tree, seed_sweep

from rayrcm import recipe_cli
from rayrcm.config import ExperimentConfig, from_dict
from rayrcm.quickstart import certify_config as quickstart_certify
from rayrcm.quickstart import pretrain_config as quickstart_pretrain
from rayrcm.sections import sigma_alias

REGISTER_AS = "rcm-digits"
EXPERIMENT = "rayrcm-digits"
DATA = {"name": "digits", "image_size": 16, "val_fraction": 0.1}
FINETUNE_CONFIG = {"warmup_epochs": 2, "schedule_epochs": 30, "scale_lr": True, "patch_size": 0, "hidden_dim": 512,
                   "output_dim": 128, "gpus": 2}
_COMMON = {"eta": 0.5, "epochs": 30, "layernorm": True, "lr_layer_decay": 1.0, "optimizer": "adamw", "lr": 2e-3,
           "weight_decay": 0.0, "batch_size": 128, "augmentation_type": "weak", "mixup": 0.0, "cutmix": 0.0,
           "label_smoothing": 0.0}
FINETUNE = {0.25: {**_COMMON, "lbd": 10.0, "noise_aug": 0.5}, 0.5: {**_COMMON, "lbd": 20.0, "noise_aug": 1.0},
            1.0: {**_COMMON, "lbd": 20.0, "noise_aug": 2.0}}


def pretrain_config(size: str = "b") -> ExperimentConfig:
    return quickstart_pretrain()


def pretrain_grid() -> dict[str, float]:
    """The Karras grid the digits pretraining ends with (:func:`rcm_input_scale` keywords)."""
    from rayrcm.objectives.rcm import (
        num_levels,  # torch: loaded when a config is built, not for --help
    )

    pre = quickstart_pretrain()
    m, steps = pre.method, pre.train.steps
    return {"levels": num_levels(steps, steps, m.levels_start, m.levels_end), "sigma_min": m.sigma_min,
            "sigma_max": m.sigma_max, "rho": m.rho}


def finetune_config(sigma: float) -> ExperimentConfig:
    tree = finetune_tree(FINETUNE[sigma], FINETUNE_CONFIG, data=DATA, encoder="vit_digits", register_as=REGISTER_AS,
                         experiment=EXPERIMENT, workers=FINETUNE_CONFIG["gpus"], grid=pretrain_grid())
    tree["train"].update(use_gpu=False, checkpoint_epochs=5, log_every=50)
    tree["model"].pop("patch_size")
    return from_dict(tree)


def certify_config(sigma: float) -> list[str]:
    base = quickstart_certify(f"models:/{REGISTER_AS}@{sigma_alias(sigma)}", "sqlite:///mlflow.db")
    return [f"model={base.model}", f"smoothing.sigma={sigma}", "smoothing.n0=100", "smoothing.n=1000",
            "smoothing.skip=4", "smoothing.chunk=1000", "compute.workers=2"]


def _quickstart(args) -> None:
    from rayrcm import quickstart

    quickstart.run(args.overrides)


def main(argv: list[str] | None = None) -> None:
    quick = recipe_cli.Command("quickstart", "pretrain, consistency fine-tune and certify at sigma 0.25 (rayrcm "
                               "quickstart)", _quickstart, "python {prog} quickstart --set train.workers=1",
                               keys="keys: --set goes to both its pretraining and its fine-tuning", dry_run=False)
    recipe_cli.main(argv, doc=__doc__, commands=[*commands(
        pretrain=pretrain_config, finetune=finetune_config, certify=certify_config,
        sweep=lambda sigma, random: seed_sweep(FINETUNE[sigma], random), recipe="rcm-digits"), quick])


if __name__ == "__main__":
    main()
