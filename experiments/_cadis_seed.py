"""Shared by the CADIS recipes (seed 002, github.com/suhyeok-jang/FT-CADIS): the authors' values,
as their launch scripts and README pass them, turned into rayrcm configs, and the stage command line
(``finetune``, ``certify``).

Where each value comes from (``train.py`` defaults fill what a command leaves out):

* CIFAR-10, ``train_cifar10.sh:93-107`` launched as the README says
  (``bash train_cifar10.sh --ngpus 4 --noise 1.00 --blr 1e-4 --batch 32 --accum_iter 4 --lbd 4.0``):
  ``--ft_method full-ft --weight_decay 0.04 --weight_decay_end 0.4 --layer_decay 0.65 --drop_path 0.2
  --warmup_epochs 3 --epochs 30 --eps 64 --num-steps 4 --num_noises 4 --clip_grad 0.3 --use_fp16 true
  --warm_start``; ``--min_lr`` 1e-6 (``train.py:64-69``).
* ImageNet, ``train_imagenet.sh:108-122`` launched as the README says (``--ngpus 4 --noise 1.00
  --blr 4e-4 --batch 16 --accum_iter 4 --lbd 2.0 --weight_decay 0.01 --weight_decay_end 0.1
  --layer_decay 0.9``): ``--ft_method lora --drop_path 0.0 --warmup_epochs 1 --epochs 10 --eps 64
  --num-steps 1 --num_noises 2 --clip_grad 1.0 --use_fp16 true --warm_start``. The script has no
  default for the three decay values: without the README's flags it passes ``--weight_decay
  --weight_decay_end --layer_decay`` with no values and ``train.py``'s parser stops, so the
  README's 0.01 / 0.1 / 0.9 are the values (not ``train.py``'s 0.04 / 0.4 / 0.65).
* Both scripts default to 4 GPUs (``GPUS=4``). The scripts parse ``--num_noises`` and ``--eps`` but
  always pass the literals above.

Conversions, each written once below:

* ``--noise`` (``train_noise_sd``) is already in pixel units: ``method.sigma = noise`` (the code
  doubles it for its [-1, 1] data, ``train.py:261``). ``--eps 64`` is divided by 256
  (``train.py:190``) and is in [-1, 1] units, as ``method.eps``: 0.25.
* Batches (``train.py:202, 439-479``): each GPU's loader batch of ``batch`` images is cut into
  ``M = num_noises`` chunks of ``batch / M`` images, each chunk repeated M times; one optimizer step
  takes ``accum_iter`` chunks. ``data.batch_size`` counts unique images per micro-batch over all
  workers, ``gpus * batch / M``; ``train.accum_iter = accum_iter``; the update sees
  ``gpus * batch * accum_iter / M`` = 128 unique images (the authors' effective batch) and
  ``lr = blr * 128 / 256``.
* Schedules (``utils/lr_sched.py``): linear warm-up over ``warmup_epochs``, then a cosine to
  ``min_lr``; weight decay a per-step cosine from ``weight_decay`` to ``weight_decay_end`` on the
  decaying groups (``optim.weight_decay_end``); fp16 with a GradScaler (``train.precision=fp16``).
* Inputs: CIFAR-10 images at 32 px (RandomCrop 4 + flip: ``augmentation=weak``, ``hflip``) are
  upsampled bicubically to 224 inside the classifier (``classifier.py:61``); ImageNet images at
  224 (RandomResizedCrop + flip; Resize 256, CenterCrop 224 for tests) go to 384
  (``classifier.py:93``): ``model.input_resize``.
* The classifier: rayrcm downloads nothing, so the off-the-shelf weights (HF
  ``aaraki/vit-base-patch16-224-in21k-finetuned-cifar10``; timm
  ``vit_base_patch16_clip_384.laion2b_ft_in12k_in1k``) come from the user's local file
  (``model.init_from``): the encoders ``vit_base_patch16_224`` (timm's ViT-B/16 with qkv bias, the
  HF model's architecture; its weights converted to timm's layout) and ``vit_base_patch16_clip_384``
  (the timm model itself: ``torch.save(model.state_dict(), path)`` loads as is, its head kept when
  it has the dataset's classes). LoRA (``model.lora_rank`` 4, ``model.lora_alpha`` 4: the authors'
  ``LoRA_ViT_timm(r=4, alpha=4)`` on q and v of every block, head trained) for ImageNet.
* The denoiser: the authors' improved-diffusion CIFAR-10 checkpoint ``cifar10_uncond_50M_500K.pt``
  and guided-diffusion ``256x256_diffusion_uncond.pt``, through ``adm:module:factory`` (a zero-argument
  function of the user's that builds the OpenAI model with the authors' ``Improved_Diffusion_Args`` /
  ``Guided_Diffusion_Args``, ``denoiser.py``) and the schedule presets.
* Not expressible: the CIFAR "drop_path" 0.2 (the authors write it into attention dropout,
  ``classifier.py:44-48``); rayrcm's model has no such key.

Per-sigma values: both scripts train at sigma = 1.0 only; the values for 0.25 and 0.5 are "in our
paper" (README), not in the code. ``--sigma 0.25 | 0.5`` changes the training and certification
noise only and keeps the sigma = 1.0 values (docs/fidelity.md).

Certification (README; ``certify.py``): ``--skip 1 --N0 100 --alpha 0.001`` (default) with
``--N 100000`` on the whole CIFAR-10 test set and ``--N 10000`` on ImageNet, where
``sample_1_per_class_imagenet`` (``utils/utils.py:537-548``) keeps one random image per class after
``random.seed(0)`` (``--seed 0``): :func:`one_per_class` draws the same indices for the standard
validation folder (1000 classes x 50 images, sorted as ImageFolder sorts them).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from rayrcm import recipe_cli
from rayrcm.errors import ConfigError
from rayrcm.sections import sigma_alias

SIGMAS = (0.25, 0.5, 1.0)
# README (train and certify commands) and the launch scripts; names as the authors' flags
CIFAR10 = {"ngpus": 4, "noise": 1.0, "blr": 1e-4, "batch": 32, "accum_iter": 4, "lbd": 4.0, "num_noises": 4, "eps": 64,
           "num_steps": 4, "warm_start": True, "epochs": 30, "warmup_epochs": 3, "min_lr": 1e-6, "weight_decay": 0.04,
           "weight_decay_end": 0.4, "layer_decay": 0.65, "drop_path": 0.2, "clip_grad": 0.3, "use_fp16": True,
           "ft_method": "full-ft", "input_size": 224, "encoder": "vit_base_patch16_224"}
IMAGENET = {"ngpus": 4, "noise": 1.0, "blr": 4e-4, "batch": 16, "accum_iter": 4, "lbd": 2.0, "num_noises": 2, "eps": 64,
            "num_steps": 1, "warm_start": True, "epochs": 10, "warmup_epochs": 1, "min_lr": 1e-6, "weight_decay": 0.01,
            "weight_decay_end": 0.1, "layer_decay": 0.9, "drop_path": 0.0, "clip_grad": 1.0, "use_fp16": True,
            "ft_method": "lora", "lora_r": 4, "lora_alpha": 4, "input_size": 384,
            "encoder": "vit_base_patch16_clip_384"}
CERTIFY = {"cifar10": {"skip": 1, "N0": 100, "N": 100_000, "alpha": 0.001, "seed": 0},
           "imagenet": {"skip": 1, "N0": 100, "N": 10_000, "alpha": 0.001, "seed": 0, "per_class": 1}}
IMAGENET_VAL = (1000, 50)  # classes, images per class of the ILSVRC-2012 validation folder


def effective_batch(cmd: dict[str, Any]) -> int:
    """``int(batch * accum_iter * world_size / num_noises)`` (``train.py:202``)."""
    return int(cmd["batch"] * cmd["accum_iter"] * cmd["ngpus"] / cmd["num_noises"])


def seed_lr(cmd: dict[str, Any]) -> float:
    """``lr = blr * eff_batch_size / 256`` (``train.py:203-204``)."""
    return cmd["blr"] * effective_batch(cmd) / 256


def finetune_tree(cmd: dict[str, Any], *, sigma: float, init_from: str, data: dict[str, Any], denoiser: dict[str, str],
                  register_as: str, experiment: str) -> dict[str, Any]:
    """A rayrcm config tree from one seed command ``cmd`` at ``sigma`` (pixel units)."""
    model: dict[str, Any] = {"encoder": cmd["encoder"], "patch_size": 16, "init_from": init_from,
                             "input_resize": cmd["input_size"]}
    if cmd["ft_method"] == "lora":
        model.update(lora_rank=cmd["lora_r"], lora_alpha=float(cmd["lora_alpha"]))
    alias = sigma_alias(sigma)
    return {
        "data": {**data, "batch_size": cmd["ngpus"] * cmd["batch"] // cmd["num_noises"], "val_fraction": 0.0},
        "model": model,
        "method": {"name": "cadis", "sigma": sigma, "m": cmd["num_noises"], "lbd": cmd["lbd"], "eps": cmd["eps"] / 256,
                   "steps": cmd["num_steps"], "warm_start": cmd["warm_start"], **denoiser},
        "optim": {"name": "adamw", "lr": seed_lr(cmd), "weight_decay": cmd["weight_decay"],
                  "weight_decay_end": cmd["weight_decay_end"], "layer_decay": cmd["layer_decay"],
                  "grad_clip": cmd["clip_grad"], "clip_mode": "per_param",  # utils.clip_gradients: each parameter alone
                  "warmup_epochs": cmd["warmup_epochs"], "min_lr": cmd["min_lr"]},
        "train": {"name": f"{register_as}-{alias}", "epochs": cmd["epochs"], "workers": cmd["ngpus"], "use_gpu": True,
                  "accum_iter": cmd["accum_iter"], "precision": "fp16" if cmd["use_fp16"] else "fp32",
                  "checkpoint_epochs": 5, "eval_sigmas": [sigma], "evals": ["noisy"], "test_evals": ["noisy"]},
        "tracking": {"experiment": experiment, "register_as": register_as, "alias": alias},
    }


def one_per_class(seed: int = 0, classes: int = IMAGENET_VAL[0], per_class: int = IMAGENET_VAL[1]) -> list[int]:
    """``sample_1_per_class_imagenet`` after ``random.seed(seed)``, for a folder sorted by class with
    ``per_class`` images each: shuffle each class's indices in class order, keep the first."""
    rng = random.Random(seed)
    picked = []
    for c in range(classes):
        group = list(range(c * per_class, (c + 1) * per_class))
        rng.shuffle(group)
        picked.append(group[0])
    return picked


def certify_args(register_as: str, sigma: float, dataset: str, protocol: dict[str, Any]) -> list[str]:
    """The authors' certification as ``rayrcm certify`` keys (fp32 as ``certify.py``, no autocast)."""
    args = [f"model=models:/{register_as}@{sigma_alias(sigma)}", f"dataset={dataset}", f"smoothing.sigma={sigma}",
            f"smoothing.n0={protocol['N0']}", f"smoothing.n={protocol['N']}", f"smoothing.alpha={protocol['alpha']}",
            f"smoothing.skip={protocol['skip']}", "compute.use_gpu=true", "compute.precision=fp32"]
    if protocol.get("per_class"):
        args.append("smoothing.indices=" + ",".join(map(str, one_per_class(protocol["seed"]))))
    return args


# ---- the command line ----

HELPS = {"finetune": "CADIS fine-tuning of the user's off-the-shelf classifier behind the frozen denoiser (Ray Train)",
         "certify": "randomized-smoothing certification of the fine-tuned denoised classifier (Ray Data)"}


def _sigma(sigma: float) -> float:
    if sigma not in SIGMAS:
        raise ConfigError("--sigma", sigma, "the seed certifies at 0.25, 0.5 or 1.0 (pixel units)")
    return sigma


def commands(*, examples: dict[str, str], finetune: Callable[..., dict[str, Any]],
             certify: Callable[[float], list[str]]) -> list[recipe_cli.Command]:
    """``finetune --from REF [--sigma] [--denoiser ...]`` and ``certify [--sigma]`` (:mod:`rayrcm.recipe_cli`)."""
    from rayrcm.config import from_dict

    sigma = recipe_cli.option("--sigma", type=float, default=1.0,
                              help="noise in pixel units, one of 0.25, 0.5, 1.0 (default 1.0, the seed's; other values "
                                   "keep its sigma-1.0 settings)")
    source = recipe_cli.option("--from", dest="init_from", required=True,
                               help="the off-the-shelf classifier: a local model.pt, models:/... or a run id (never "
                                    "downloaded)")
    denoiser = recipe_cli.option("--denoiser", help="adm:MODULE:FACTORY building the OpenAI diffusion model")
    weights = recipe_cli.option("--denoiser-weights", help="its state dict file (the authors' checkpoint)")

    def tree(a: Any) -> Any:
        den = {k: v for k, v in (("denoiser", a.denoiser), ("denoiser_weights", a.denoiser_weights)) if v}
        return from_dict(finetune(_sigma(a.sigma), a.init_from, **den))

    return [recipe_cli.train("finetune", HELPS["finetune"], tree, example=examples["finetune"],
                             options=[sigma, source, denoiser, weights]),
            recipe_cli.certify(HELPS["certify"], lambda a: certify(_sigma(a.sigma)), example=examples["certify"],
                               options=[sigma])]


__all__ = ["CERTIFY", "CIFAR10", "IMAGENET", "SIGMAS", "certify_args", "effective_batch", "finetune_tree",
           "commands", "one_per_class", "seed_lr"]
