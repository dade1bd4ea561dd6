"""RCM on CIFAR-10: the seed's commands (pretraining RCM-B, consistency fine-tuning at sigma
0.25 / 0.5 / 1.0, certification with n = 100,000) as rayrcm stages.

    python experiments/rcm_cifar10.py pretrain --set data.path=DIR
    python experiments/rcm_cifar10.py finetune --sigma 0.25 --set data.path=DIR --set model.init_from=<pretrain run id>
    python experiments/rcm_cifar10.py tune     --sigma 0.25 [--random] --set data.path=DIR [--space key=spec ...]
    python experiments/rcm_cifar10.py certify  --sigma 0.25 --set data_path=DIR
    python experiments/rcm_cifar10.py analyze  rayrcm_results/certify/<job> ...
    (any stage) --dry-run   # print the resolved config

``DIR`` holds ``cifar-10-batches-py/``. On a cluster: ``ray job submit --working-dir . -- python
experiments/rcm_cifar10.py finetune --sigma 0.5 ...``. Units and conversions: ``_rcm_seed.py``.
"""

from __future__ import annotations

from _rcm_seed import certify_args, commands, finetune_tree, pretrain_tree, seed_sweep

from rayrcm import recipe_cli
from rayrcm.config import ExperimentConfig, from_dict

REGISTER_AS = "rcm-b-cifar10"
EXPERIMENT = "rcm-cifar10"
DATA = {"name": "cifar10", "image_size": 32, "val_fraction": 0.1, "num_workers": 4}

# configs/cifar10_pretrain_rcmb.py (train.py on 8 GPUs)
SEED_PRETRAIN = {
    "steps": 300_000, "batch_size": 2048, "lr": 1e-4, "weight_decay": 0.0, "warmup_steps": 10_000, "gradclip": 2.0,
    "target_ema_A": 15, "start_ema": 0.99, "end_ema": 0.9999, "start_scales": 20, "end_scales": 80,
    "sigma_min": 0.002, "sigma_max": 80.0, "tau": 0.2, "patch_size": 4, "hidden_dim": 2048, "output_dim": 256,
    "save_interval": 50_000, "gpus": 8, "gradclip_method": "after_warmup", "stop_grad_conv1": False, "moco_initialization": False,
}

# configs/cifar10_finetune.py: values the commands do not override
SEED_FINETUNE_CONFIG = {"warmup_epochs": 10, "schedule_epochs": 100, "scale_lr": True, "patch_size": 4, "hidden_dim": 2048,
                        "output_dim": 256, "gpus": 8}

# the README's `accelerate launch --num_processes 8 rrcm_tune.py --config=configs/cifar10_finetune.py ...` commands
SEED_FINETUNE = {
    0.25: {"eta": 0.5, "lbd": 10.0, "noise_aug": 0.5, "epochs": 100, "layernorm": False, "lr_layer_decay": 0.75,
           "optimizer": "adamw", "lr": 2e-4, "weight_decay": 0.0, "batch_size": 1024, "augmentation_type": "weak",
           "mixup": 0.0, "cutmix": 0.0, "label_smoothing": 0.0},
    0.5: {"eta": 0.5, "lbd": 20.0, "noise_aug": 1.0, "epochs": 100, "layernorm": False, "lr_layer_decay": 0.75,
          "optimizer": "adamw", "lr": 2e-4, "weight_decay": 0.0, "batch_size": 1024, "augmentation_type": "weak",
          "mixup": 0.0, "cutmix": 0.0, "label_smoothing": 0.0},
    1.0: {"eta": 0.5, "lbd": 20.0, "noise_aug": 2.0, "epochs": 100, "layernorm": False, "lr_layer_decay": 0.65,
          "optimizer": "adamw", "lr": 2e-4, "weight_decay": 0.0, "batch_size": 1024, "augmentation_type": "weak",
          "mixup": 0.0, "cutmix": 0.0, "label_smoothing": 0.0},
}


def pretrain_config(size: str = "b") -> ExperimentConfig:
    return from_dict(pretrain_tree(SEED_PRETRAIN, data=DATA, encoder="rcm_b", name="rcm-b-cifar10-pretrain",
                                   experiment=EXPERIMENT, workers=SEED_PRETRAIN["gpus"]))


def finetune_config(sigma: float) -> ExperimentConfig:
    return from_dict(finetune_tree(SEED_FINETUNE[sigma], SEED_FINETUNE_CONFIG, data=DATA, encoder="rcm_b",
                                   register_as=REGISTER_AS, experiment=EXPERIMENT, workers=SEED_FINETUNE_CONFIG["gpus"]))


def certify_config(sigma: float) -> list[str]:
    return certify_args(REGISTER_AS, sigma, "cifar10", skip=1, max_index=500)  # certify.py: test images 0-499


def main(argv: list[str] | None = None) -> None:
    recipe_cli.main(argv, doc=__doc__, commands=commands(
        pretrain=pretrain_config, finetune=finetune_config, certify=certify_config,
        sweep=lambda sigma, random: seed_sweep(SEED_FINETUNE[sigma], random), recipe="rcm-cifar10"))


if __name__ == "__main__":
    main()
