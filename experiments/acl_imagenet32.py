"""ACL + RCS on ImageNet-1K at 32 x 32 (WRN-28-10, coreset fraction 0.05) and transfer to CIFAR-10,
with the RCS authors' settings (seed 001, ``ACL_RCS/ImageNet_32/ACL_RCS.py --ACL_DS --fraction 0.05``).

    python experiments/acl_imagenet32.py pretrain --method acl_rcs --set data.path=/data/imagenet32   # ImageFolder, 32 px
    python experiments/acl_imagenet32.py finetune --method acl_rcs --mode all --set data.path=/data   # /data holds cifar-10-batches-py/

ACL + RCS uses the RCS authors' ImageNet-32 script (``ACL_RCS/ImageNet_32/ACL_RCS.py``) values:
WRN-28-10 with their two-layer ``proj_head_module(640)`` (fc-BN-ReLU-fc-BN), 200 epochs, LARS lr 0.6
(weight decay 1e-6 on every parameter) with a 2-epoch linear warm-up and a cosine to 1e-6,
temperature 0.1 in the loss and the attack, ACL without DynACL's schedule, the loss
``(CL(nat) + CL(adv)) / 2``, 0.5% held out as RCS's validation set, coreset fraction 0.05 chosen
first after 20 warm-up epochs and again every 10, greedy step 0.01. The other methods (not run by
the authors on ImageNet-32) keep the CIFAR values of _acl_seed.py with the WRN, its 640-wide
projector and 200 epochs. Fine-tuning to CIFAR-10 uses the authors' ``transfer.py`` /
``adv_tune.py`` learning rates (SLF 0.01, ALF and AFF 0.1) and their Nesterov momentum.
"""

from __future__ import annotations

from _acl_seed import (
    FINETUNE,
    FINETUNE_COMMON,
    PRETRAIN,
    PRETRAIN_COMMON,
    commands,
    finetune_tree,
    pretrain_tree,
)

from rayrcm import recipe_cli
from rayrcm.config import ExperimentConfig, from_dict

REGISTER_AS = "acl-imagenet32"
EXPERIMENT = "rayrcm-acl-imagenet32"
PRETRAIN_DATA = {"name": "imagefolder", "image_size": 32, "crop_pct": 1.0, "hflip": True}
FINETUNE_DATA = {"name": "cifar10", "image_size": 32, "augmentation": "weak", "hflip": True}
IMAGENET32 = {"epochs": 200, "ch": 640, "checkpoint_epochs": 10}  # every method: the WRN's width, 200 epochs
# ACL_RCS.py: --lr 0.6, warmup_steps = 2 * len(train_loader), nt_xent(t=0.1), --warmup 20 --fre 10 --fraction 0.05
# --Coreset_lr 0.01, 99.5% / 0.5% split, proj_head_module (two layers), loss (CL(nat) + CL(adv)) / 2, no DynAug
IMAGENET32_RCS = {"lr": 0.6, "lr_warmup": 2, "temperature": 0.1, "DynAug": False, "twoLayerProj": True, "loss_scale": 0.5,
                  "fraction": 0.05, "warmup": 20, "interval": 10, "coreset_lr": 0.01, "val_fraction": 0.005}
LRS = {"slf": 0.01, "alf": 0.1, "aff": 0.1}


def pretrain_config(method: str) -> ExperimentConfig:
    cmd = {**PRETRAIN_COMMON, **PRETRAIN[method], **IMAGENET32, **(IMAGENET32_RCS if method == "acl_rcs" else {})}
    return from_dict(pretrain_tree(method, cmd, data=PRETRAIN_DATA, encoder="wrn28_10", register_as=REGISTER_AS,
                                   experiment=EXPERIMENT, workers=8))


def finetune_config(mode: str, method: str, init_from: str | None = None) -> ExperimentConfig:
    ref = init_from or f"models:/{REGISTER_AS}@{method.replace('_', '-')}"
    # the authors' transfer.py / adv_tune.py: SGD(..., nesterov=True)
    common = {**FINETUNE_COMMON, "nesterov": True}
    return from_dict(finetune_tree(mode, {**FINETUNE[mode], "lr": LRS[mode]}, common, init_from=ref, data=FINETUNE_DATA,
                                   encoder="wrn28_10", name=f"{REGISTER_AS}-{method.replace('_', '-')}-to-cifar10",
                                   experiment=EXPERIMENT, workers=4))


def main(argv: list[str] | None = None) -> None:
    recipe_cli.main(argv, doc=__doc__, commands=commands(pretrain=pretrain_config, finetune=finetune_config,
                                                         recipe="acl-imagenet32"))


if __name__ == "__main__":
    main()
