"""ACL + RCS on ImageNet-1K at 32 x 32 (WRN-28-10, coreset fraction 0.05) and transfer to CIFAR-10,
with the RCS authors' settings (seed 001, ``ACL_RCS/ImageNet_32/ACL_RCS.py --ACL_DS --fraction 0.05``).

    python experiments/acl_imagenet32.py pretrain --method acl_rcs --set data.path=/data/imagenet32   # ImageFolder, 32 px
    python experiments/acl_imagenet32.py finetune --method acl_rcs --mode all --set data.path=/data/cifar-10-batches-py

The ImageNet-32 run keeps the CIFAR pretraining values of _acl_seed.py except the network
(WRN-28-10), the fraction (0.05) and fewer epochs (the authors train 200 with warm-up 10 and a new
coreset every 10 epochs on ImageNet-32). Fine-tuning to CIFAR-10 uses the authors' ``transfer.py`` /
``adv_tune.py`` learning rates: SLF 0.01, ALF and AFF 0.1.
"""

from __future__ import annotations

from _acl_seed import (
    FINETUNE,
    FINETUNE_COMMON,
    PRETRAIN,
    PRETRAIN_COMMON,
    finetune_tree,
    pretrain_tree,
    stage_main,
)

from rayrcm.config import ExperimentConfig, from_dict

REGISTER_AS = "acl-imagenet32"
EXPERIMENT = "rayrcm-acl-imagenet32"
PRETRAIN_DATA = {"name": "imagefolder", "image_size": 32, "crop_pct": 1.0, "hflip": True, "val_fraction": 0.005}
FINETUNE_DATA = {"name": "cifar10", "image_size": 32, "augmentation": "weak", "hflip": True}
IMAGENET32 = {"epochs": 200, "fraction": 0.05, "warmup": 10, "interval": 10, "checkpoint_epochs": 10}
LRS = {"slf": 0.01, "alf": 0.1, "aff": 0.1}


def pretrain_config(method: str) -> ExperimentConfig:
    cmd = {**PRETRAIN_COMMON, **PRETRAIN[method], **({k: v for k, v in IMAGENET32.items() if method == "acl_rcs" or k == "epochs"})}
    return from_dict(pretrain_tree(method, cmd, data=PRETRAIN_DATA, encoder="wrn28_10", register_as=REGISTER_AS,
                                   experiment=EXPERIMENT, workers=8))


def finetune_config(mode: str, method: str, init_from: str | None = None) -> ExperimentConfig:
    ref = init_from or f"models:/{REGISTER_AS}@{method.replace('_', '-')}"
    return from_dict(finetune_tree(mode, {**FINETUNE[mode], "lr": LRS[mode]}, FINETUNE_COMMON, init_from=ref, data=FINETUNE_DATA,
                                   encoder="wrn28_10", name=f"{REGISTER_AS}-{method.replace('_', '-')}-to-cifar10",
                                   experiment=EXPERIMENT, workers=4))


if __name__ == "__main__":
    stage_main(None, doc=__doc__, pretrain=pretrain_config, finetune=finetune_config)
