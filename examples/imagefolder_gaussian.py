"""Your own images (an ImageFolder tree), Gaussian-noise training and certification.

    python examples/imagefolder_gaussian.py train   --set data.path=DIR   # DIR/train/<class>/*.jpg, DIR/val/<class>/*.jpg
    python examples/imagefolder_gaussian.py certify                       # on DIR/val, every 100th image
    python examples/imagefolder_gaussian.py analyze                       # the certified-accuracy table
    rayrcm config examples/imagefolder_gaussian.py                        # every key and its value

Cohen et al.'s ImageNet setting on any folder of class folders: ResNet-50, Gaussian noise
augmentation at sigma = 0.5 (pixel units, data in [0, 1]), SGD lr 0.1, momentum 0.9, weight decay
1e-4, 90 epochs with the lr divided by 10 every 30, random resized crop and flip at 224 px; the
test split is ``val/``. Certified with n0 = 100, n = 100,000, alpha = 0.001 on every 100th image
(folders are class-sorted: the first images cover few classes). Smaller images: ``--set
data.image_size=64``; on GPUs: ``--set train.use_gpu=true --set train.workers=8``.
"""

from __future__ import annotations

from typing import Any

from rayrcm.sections import sigma_alias

SIGMA = 0.5
REGISTER_AS = "imagefolder-gaussian"
ALIAS = sigma_alias(SIGMA)
JOB = f"{REGISTER_AS}-{ALIAS}"
EXAMPLES = {
    "train": "python examples/imagefolder_gaussian.py train --set data.path=/data/pets --set train.use_gpu=true",
    "certify": "python examples/imagefolder_gaussian.py certify --set compute.workers=4 --set compute.use_gpu=true",
    "analyze": f"python examples/imagefolder_gaussian.py analyze rayrcm_results/certify/{JOB}",
}


def config() -> Any:
    """The training config (``rayrcm train`` and ``rayrcm config`` read this function)."""
    from rayrcm.config import from_dict

    return from_dict({
        "data": {"name": "imagefolder", "augmentation": "weak", "hflip": True, "batch_size": 256, "val_fraction": 0.05,
                 "num_workers": 4},
        "model": {"encoder": "resnet50"},
        "method": {"name": "gaussian", "sigma": SIGMA},
        "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4, "schedule": "step",
                  "milestone_epochs": (30, 60), "gamma": 0.1},
        "train": {"name": f"{REGISTER_AS}-train", "epochs": 90, "checkpoint_epochs": 5, "eval_sigmas": (SIGMA,),
                  "select_metric": f"val_acc_sigma_{SIGMA:g}"},
        "tracking": {"experiment": "examples-imagefolder", "register_as": REGISTER_AS, "alias": ALIAS},
    })


def certify() -> list[str]:
    """The certification (CertifyConfig keys): the model by its registry alias, Cohen et al.'s protocol."""
    return [f"model=models:/{REGISTER_AS}@{ALIAS}", f"name={JOB}", f"smoothing.sigma={SIGMA}", "smoothing.n0=100",
            "smoothing.n=100000", "smoothing.alpha=0.001", "smoothing.skip=100", "smoothing.max=-1"]


def main(argv: list[str] | None = None) -> None:
    from rayrcm import recipe_cli

    recipe_cli.main(argv, doc=__doc__, commands=recipe_cli.classifier_commands(
        config, certify, examples=EXAMPLES, recipe="examples/imagefolder_gaussian.py"))


if __name__ == "__main__":
    main()
