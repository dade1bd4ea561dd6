"""MoCo-v2 with non-semantic negatives (seed 004) on the bundled digits, on a laptop CPU.

    python experiments/moco_digits.py pretrain [--negatives none|patch] [--alpha 2] [--set key=value ...]
    python experiments/moco_digits.py probe    --from <pretrain run id | models:/... | path> [--set key=value ...]
    python experiments/moco_digits.py all      [--set key=value | STAGE:key=value ...]   # the table, one job
    (pretrain, probe, all) --dry-run    # print the resolved config (all: the stages, with what is reused)

Pretraining keeps the seed's method settings (T = 0.2, 128-d MLP head, MoCo v2 views with blur, one
patch negative per query, alpha = 2, patch sides 16-72 at 224 px, i.e. 1-5 px at 16 px; SGD momentum
0.9, wd 1e-4, batch 128, cosine without warm-up) at digits scale: a CIFAR ResNet-20, 500 steps, lr 0.06,
a queue of 512 keys (the training split holds ~1,600 images, so the seed's 16,384 would repeat
each image ten times) and m = 0.99 (0.999 barely moves the key encoder in 500 steps). Two CPU
workers, per-worker BatchNorm (shuffle BN). Plain MoCo logs the mean non-semantic logit too
(``method.monitor``), so the two runs can be compared. Both stages flip horizontally as the authors'
pipelines do (``--aug-plus``, ``main_lincls.py``), though digits are not mirror-symmetric: the
recipe keeps the method's views as they are.

``probe`` is MoCo's linear evaluation (``main_lincls.py``) on the frozen encoder in eval mode:
SGD lr 10, momentum 0.9, wd 0, batch 128, lr x0.1 at 50/67/83% of training (30/40/50 of 60
epochs), here 60 epochs of the digits; the head starts at zero (the authors: N(0, 0.01)).
"""

from __future__ import annotations

from rayrcm import recipe_cli
from rayrcm.config import ExperimentConfig, from_dict

REGISTER_AS = "moco-digits"
EXPERIMENT = "rayrcm-moco-digits"
DATA = {"name": "digits", "image_size": 16, "hflip": True, "val_fraction": 0.1, "batch_size": 128}
ENCODER = "cifar_resnet20"


def pretrain_config(negatives: str = "patch", alpha: float = 2.0) -> ExperimentConfig:
    """The digits pretraining (``negatives="none"``: plain MoCo v2, with the non-semantic logit logged)."""
    alias = "plain" if negatives == "none" else f"{negatives}-a{alpha:g}"
    return from_dict({
        "data": {**DATA},
        "model": {"encoder": ENCODER},
        "method": {"name": "moco", "temperature": 0.2, "queue_size": 512, "momentum": 0.99, "dim": 128, "mlp": True,
                   "negatives": negatives, "alpha": alpha, "n_negatives": 1, "patch_min": 16, "patch_max": 72,
                   "view": "mocov2", "monitor": negatives == "none"},
        "optim": {"name": "sgd", "lr": 0.06, "momentum": 0.9, "weight_decay": 1e-4, "weight_decay_all": True,
                  "schedule": "cosine", "warmup_steps": 0},
        "train": {"name": f"{REGISTER_AS}-{alias}", "steps": 500, "workers": 2, "sync_bn": False, "use_gpu": False,
                  "checkpoint_every": 250, "log_every": 50},
        "tracking": {"experiment": EXPERIMENT, "register_as": REGISTER_AS, "alias": alias},
    })


def probe_config(init_from: str, epochs: int = 60) -> ExperimentConfig:
    """MoCo's linear evaluation on the frozen encoder, the shared linear-probe stage with MoCo's
    protocol (one head, SGD lr 10, wd 0, x0.1 at 30/40/50 of 60 epochs, scaled with ``epochs``)."""
    from rayrcm.objectives.linear_probe import recipe

    tree = recipe("moco", init_from=init_from, encoder=ENCODER, epochs=epochs, name=f"{REGISTER_AS}-probe",
                  experiment=EXPERIMENT, data={**DATA, "augmentation": "crop", "val_fraction": 0.1})
    tree["train"].update(workers=2, use_gpu=False, checkpoint_epochs=epochs / 2, log_every=50)
    return from_dict(tree)


def table_stages() -> list:
    """The seed's comparison as stages: plain MoCo v2 and MoCo v2 with patch negatives, each followed
    by the linear probe (a row each: the pretraining's k-NN accuracy, the probe's test accuracy)."""
    from functools import partial

    from rayrcm.pipeline import Stage

    out = []
    for negatives, alias, row in (("none", "plain", "MoCo v2"), ("patch", "patch", "MoCo v2 + patch negatives")):
        out.append(Stage(f"pretrain-{alias}", "train", partial(pretrain_config, negatives), row=row,
                         columns={"k-NN": "test_knn_acc"}))
        out.append(Stage(f"probe-{alias}", "train", partial(probe_config, "placeholder"), row=row,
                            inputs={"model.init_from": f"pretrain-{alias}"}, columns={"linear probe": "test_acc_clean"}))
    return out


def main(argv: list[str] | None = None) -> None:
    negatives = recipe_cli.option("--negatives", default="patch", choices=("none", "patch"),
                                  help="patch negatives (default) or plain MoCo v2 (none)")
    alpha = recipe_cli.option("--alpha", type=float, default=2.0, help="the patch negatives' weight (default 2)")
    source = recipe_cli.option("--from", dest="init_from", default=f"models:/{REGISTER_AS}@patch-a2",
                               help="the pretrained encoder to probe (default models:/moco-digits@patch-a2)")
    recipe_cli.main(argv, doc=__doc__, commands=[
        recipe_cli.train("pretrain", "MoCo v2 pretraining, with or without patch negatives (Ray Train)",
                         lambda a: pretrain_config(a.negatives, a.alpha), options=[negatives, alpha],
                         example="python {prog} pretrain --negatives patch --alpha 2"),
        recipe_cli.train("probe", "linear probe of a pretrained encoder (Ray Train)",
                         lambda a: probe_config(a.init_from), options=[source], example="python {prog} probe"),
        recipe_cli.table("moco-digits", lambda a: table_stages(),
                         help="the whole table in one resumable job: MoCo v2 and patch negatives, each probed",
                         example="python {prog} all [--set pretrain-patch:train.steps=600] [--dry-run]",
                         names="pretrain-plain, pretrain-patch, probe-plain, probe-patch"),
    ])


if __name__ == "__main__":
    main()
