"""The adversarial contrastive chain on the bundled digits, in minutes on a laptop CPU:
pretrain (CL, ACL, AIR or ACL + RCS) a small BatchNorm ResNet, then SLF, ALF and AFF with SA /
PGD-20 / AA, the same code paths as the CIFAR recipes (acl_cifar10.py) at digits scale.

    python experiments/acl_digits.py pretrain --method air
    python experiments/acl_digits.py finetune --method air --mode all
    python experiments/acl_digits.py all      --method air        # both, as one resumable job, and the table
    (pretrain, finetune, all) --dry-run

Digits-sized settings (everything else as the authors'): CIFAR ResNet-20 with a 128-wide projector,
batch 128, 20 pretraining epochs with Adam lr 2e-3 (LARS lr 5.0 is tuned for batch 512 and 1000
epochs) after a 1-epoch warm-up, DynACL's strength stepped every 5 epochs, RCS warm-up 6 epochs, a
new coreset every 4 and 10% held out for it; fine-tuning 10 epochs
(milestones 5 and 8), evaluation on 300 test images with APGD at 50 iterations. The budget stays
L-inf 8/255. No horizontal flips (digits are not mirror-symmetric).
"""

from __future__ import annotations

from _acl_seed import (
    FINETUNE_COMMON,
    PRETRAIN,
    PRETRAIN_COMMON,
    commands,
    finetune_cmd,
    finetune_tree,
    pretrain_tree,
)

from rayrcm import recipe_cli
from rayrcm.config import ExperimentConfig, from_dict

REGISTER_AS = "acl-digits"
EXPERIMENT = "rayrcm-acl-digits"
DATA = {"name": "digits", "image_size": 16, "hflip": False, "val_fraction": 0.1}
PRETRAIN_DIGITS = {"batch_size": 128, "epochs": 20, "optimizer": "adam", "lr": 2e-3, "weight_decay": 0.0, "lr_warmup": 1, "ch": 128,
                   "checkpoint_epochs": 5, "log_every": 10}
RCS_DIGITS = {"warmup": 6, "interval": 4, "val_fraction": 0.1}
FINETUNE_DIGITS = {"batch_size": 128, "epochs": 10, "decreasing_lr": (5, 8), "checkpoint_epochs": 5, "log_every": 10}
EVAL_DIGITS = {"eval_max_images": 300, "eval_aa_iters": 50, "eval_aa_queries": 500}


def pretrain_config(method: str) -> ExperimentConfig:
    cmd = {**PRETRAIN_COMMON, **PRETRAIN[method], **PRETRAIN_DIGITS, **(RCS_DIGITS if method == "acl_rcs" else {})}
    tree = pretrain_tree(method, cmd, data=DATA, encoder="cifar_resnet20", register_as=REGISTER_AS, experiment=EXPERIMENT,
                         workers=2, use_gpu=False)
    if tree["method"]["name"] != "simclr":
        tree["method"]["dynamic_period"] = 5
    return from_dict(tree)


def finetune_config(mode: str, method: str, init_from: str | None = None) -> ExperimentConfig:
    ref = init_from or f"models:/{REGISTER_AS}@{method.replace('_', '-')}"
    cmd = {**finetune_cmd(mode, method), **FINETUNE_DIGITS}
    return from_dict(finetune_tree(mode, cmd, FINETUNE_COMMON, init_from=ref, data={**DATA, "augmentation": "weak"},
                                   encoder="cifar_resnet20", name=f"{REGISTER_AS}-{method.replace('_', '-')}-transfer",
                                   experiment=EXPERIMENT, workers=2, use_gpu=False, eval_extra=EVAL_DIGITS))


def main(argv: list[str] | None = None) -> None:
    recipe_cli.main(argv, doc=__doc__, commands=commands(pretrain=pretrain_config, finetune=finetune_config,
                                                         recipe="acl-digits"))


if __name__ == "__main__":
    main()
