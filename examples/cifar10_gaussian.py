"""CIFAR-10, Gaussian-noise training and certification (Cohen, Rosenfeld & Kolter, 2019).

    python examples/cifar10_gaussian.py train   --set data.path=DIR     # DIR holds cifar-10-batches-py/
    python examples/cifar10_gaussian.py certify                         # the registered model, on its test set
    python examples/cifar10_gaussian.py analyze                         # the certified-accuracy table
    rayrcm train examples/cifar10_gaussian.py --set data.path=DIR       # the same training, through rayrcm
    rayrcm config examples/cifar10_gaussian.py                          # every key and its value

The paper's CIFAR-10 setting: ResNet-110, Gaussian noise augmentation at sigma = 0.25 (pixel units,
data in [0, 1]), SGD lr 0.1, momentum 0.9, weight decay 1e-4, 90 epochs with the lr divided by 10
every 30, random crop and flip; certified with n0 = 100, n = 100,000, alpha = 0.001 on every 20th
test image (500). On GPUs: ``--set train.use_gpu=true --set train.workers=4``.
"""

from __future__ import annotations

from typing import Any

from rayrcm.sections import sigma_alias

SIGMA = 0.25
REGISTER_AS = "cifar10-gaussian"
ALIAS = sigma_alias(SIGMA)
JOB = f"{REGISTER_AS}-{ALIAS}"
EXAMPLES = {
    "train": "python examples/cifar10_gaussian.py train --set data.path=$HOME/data --set train.use_gpu=true",
    "certify": "python examples/cifar10_gaussian.py certify --set smoothing.n=10000 --set compute.workers=2",
    "analyze": f"python examples/cifar10_gaussian.py analyze rayrcm_results/certify/{JOB}",
}


def config() -> Any:
    """The training config (``rayrcm train`` and ``rayrcm config`` read this function)."""
    from rayrcm.config import from_dict

    return from_dict({
        "data": {"name": "cifar10", "augmentation": "weak", "hflip": True, "batch_size": 256, "val_fraction": 0.1},
        "model": {"encoder": "cifar_resnet110"},
        "method": {"name": "gaussian", "sigma": SIGMA},
        "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4, "schedule": "step",
                  "milestone_epochs": (30, 60), "gamma": 0.1},
        "train": {"name": f"{REGISTER_AS}-train", "epochs": 90, "checkpoint_epochs": 10, "eval_sigmas": (SIGMA,),
                  "select_metric": f"val_acc_sigma_{SIGMA:g}"},
        "tracking": {"experiment": "examples-cifar10", "register_as": REGISTER_AS, "alias": ALIAS},
    })


def certify() -> list[str]:
    """The certification (CertifyConfig keys): the model by its registry alias, Cohen et al.'s protocol."""
    return [f"model=models:/{REGISTER_AS}@{ALIAS}", f"name={JOB}", f"smoothing.sigma={SIGMA}", "smoothing.n0=100",
            "smoothing.n=100000", "smoothing.alpha=0.001", "smoothing.skip=20", "smoothing.max=-1"]


def main(argv: list[str] | None = None) -> None:
    from rayrcm import recipe_cli

    recipe_cli.main(argv, doc=__doc__, commands=recipe_cli.classifier_commands(
        config, certify, examples=EXAMPLES, recipe="examples/cifar10_gaussian.py"))


if __name__ == "__main__":
    main()
