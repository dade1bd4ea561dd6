"""Adversarial contrastive pretraining on CIFAR-10 (CL, ACL, AIR, ACL + RCS; ResNet-18) and
transfer to CIFAR-100 by SLF, ALF and AFF, with the authors' settings (seed 001; see _acl_seed.py).

    python experiments/acl_cifar10.py pretrain --method air  --set data.path=/data   # /data holds cifar-10-batches-py/
    python experiments/acl_cifar10.py finetune --method air  --mode all --set data.path=/data   # /data holds cifar-100-python/
    (either) --dry-run   # print the resolved config(s)

Pretraining registers the encoder as ``models:/acl-cifar10@<method>`` (``acl-rcs`` for ACL + RCS);
``finetune`` starts from it (or ``--from REF``) and prints SA / PGD-20 / AA per mode. On a
cluster: ``ray job submit --working-dir . -- python experiments/acl_cifar10.py pretrain --method air``
(8 GPU workers: ``--set train.workers=8``).
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

REGISTER_AS = "acl-cifar10"
EXPERIMENT = "rayrcm-acl-cifar10"
PRETRAIN_DATA = {"name": "cifar10", "image_size": 32, "hflip": True}
FINETUNE_DATA = {"name": "cifar100", "image_size": 32, "augmentation": "weak", "hflip": True}


def pretrain_config(method: str) -> ExperimentConfig:
    return from_dict(pretrain_tree(method, {**PRETRAIN_COMMON, **PRETRAIN[method]}, data=PRETRAIN_DATA, encoder="resnet18",
                                   register_as=REGISTER_AS, experiment=EXPERIMENT, workers=4))


def finetune_config(mode: str, method: str, init_from: str | None = None) -> ExperimentConfig:
    ref = init_from or f"models:/{REGISTER_AS}@{method.replace('_', '-')}"
    return from_dict(finetune_tree(mode, finetune_cmd(mode, method), FINETUNE_COMMON, init_from=ref, data=FINETUNE_DATA, encoder="resnet18",
                                   name=f"{REGISTER_AS}-{method.replace('_', '-')}-to-cifar100", experiment=EXPERIMENT, workers=4))


def main(argv: list[str] | None = None) -> None:
    recipe_cli.main(argv, doc=__doc__, commands=commands(pretrain=pretrain_config, finetune=finetune_config,
                                                         recipe="acl-cifar10"))


if __name__ == "__main__":
    main()
