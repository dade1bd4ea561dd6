"""RCM on ImageNet: the seed's commands (pretraining RCM-B and RCM-S, consistency fine-tuning of
RCM-B at sigma 0.25 / 0.5 / 1.0, certification with n = 100,000) as rayrcm stages.

    python experiments/rcm_imagenet.py pretrain --size b|s --set data.path=DIR
    python experiments/rcm_imagenet.py finetune --sigma 0.5 --set data.path=DIR --set model.init_from=<run id>
    python experiments/rcm_imagenet.py tune     --sigma 0.5 [--random] --set data.path=DIR [--space key=spec ...]
    python experiments/rcm_imagenet.py certify  --sigma 0.5 --set data_path=DIR
    python experiments/rcm_imagenet.py analyze  rayrcm_results/certify/<job> ...
    (any stage) --dry-run   # print the resolved config

``DIR`` holds ``train/<class>/*.JPEG`` and ``val/<class>/*.JPEG``. Units and conversions:
``_rcm_seed.py``. Certification uses every 100th validation image (500 images over all classes:
the val folder is sorted by class, so its first 500 images would cover 10 classes only).
"""

from __future__ import annotations

from _rcm_seed import certify_args, commands, finetune_tree, pretrain_tree, seed_sweep

from rayrcm import recipe_cli
from rayrcm.config import ExperimentConfig, from_dict

REGISTER_AS = "rcm-b-imagenet"
EXPERIMENT = "rcm-imagenet"
DATA = {"name": "imagefolder", "image_size": 224, "val_fraction": 0.01, "num_workers": 8}

_PRETRAIN_COMMON = {"steps": 600_000, "batch_size": 4096, "gradclip": 2.0, "target_ema_A": 10, "start_ema": 0.99,
                    "end_ema": 0.9999, "start_scales": 20, "end_scales": 80, "sigma_min": 0.002, "sigma_max": 80.0,
                    "tau": 0.2, "patch_size": 16, "output_dim": 256, "save_interval": 50_000, "gradclip_method": "after_warmup",
                    "stop_grad_conv1": True, "moco_initialization": True}
# configs/imagenet_pretrain_rcmb.py (4 machines x 8 GPUs) and configs/imagenet_pretrain_rcms.py (2 x 8)
SEED_PRETRAIN = {
    "b": {**_PRETRAIN_COMMON, "lr": 2e-4, "weight_decay": 0.03, "warmup_steps": 15_000, "hidden_dim": 4096, "gpus": 32},
    "s": {**_PRETRAIN_COMMON, "lr": 1e-4, "weight_decay": 0.01, "warmup_steps": 10_000, "hidden_dim": 2048, "gpus": 16},
}

# configs/imagenet_finetune.py: values the commands do not override
SEED_FINETUNE_CONFIG = {"warmup_epochs": 5, "schedule_epochs": 150, "scale_lr": True, "patch_size": 16, "hidden_dim": 4096,
                        "output_dim": 256, "gpus": 8}

_FT_COMMON = {"eta": 0.5, "layernorm": True, "lr_layer_decay": 0.65, "optimizer": "adamw", "weight_decay": 0.0,
              "mixup": 0.8, "cutmix": 1.0, "mixup_switch_prob": 0.5, "hidden_dim": 4096}
# the README's `accelerate launch --num_processes 8 rrcm_tune.py --config=configs/imagenet_finetune.py ...` commands
SEED_FINETUNE = {
    0.25: {**_FT_COMMON, "lbd": 10.0, "noise_aug": 0.5, "epochs": 150, "lr": 2e-4, "batch_size": 1024,
           "augmentation_type": "autoaug", "label_smoothing": 0.1},
    0.5: {**_FT_COMMON, "lbd": 20.0, "noise_aug": 1.0, "epochs": 50, "lr": 2e-4, "batch_size": 2048,
          "augmentation_type": "strong", "label_smoothing": 0.0},
    1.0: {**_FT_COMMON, "lbd": 20.0, "noise_aug": 2.0, "epochs": 150, "lr": 1e-4, "batch_size": 256,
          "augmentation_type": "weak", "label_smoothing": 0.0},
}


def pretrain_config(size: str = "b") -> ExperimentConfig:
    conf = SEED_PRETRAIN[size]
    return from_dict(pretrain_tree(conf, data=DATA, encoder=f"rcm_{size}", name=f"rcm-{size}-imagenet-pretrain",
                                   experiment=EXPERIMENT, workers=conf["gpus"]))


def finetune_config(sigma: float) -> ExperimentConfig:
    return from_dict(finetune_tree(SEED_FINETUNE[sigma], SEED_FINETUNE_CONFIG, data=DATA, encoder="rcm_b",
                                   register_as=REGISTER_AS, experiment=EXPERIMENT, workers=SEED_FINETUNE_CONFIG["gpus"]))


def certify_config(sigma: float) -> list[str]:
    return certify_args(REGISTER_AS, sigma, "imagefolder", skip=100)  # 500 of the 50,000 validation images


def main(argv: list[str] | None = None) -> None:
    recipe_cli.main(argv, doc=__doc__, commands=commands(
        pretrain=pretrain_config, finetune=finetune_config, certify=certify_config,
        sweep=lambda sigma, random: seed_sweep(SEED_FINETUNE[sigma], random), sizes=("b", "s"), recipe="rcm-imagenet"))


if __name__ == "__main__":
    main()
