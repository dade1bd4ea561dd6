"""Shared by the RCM recipes: the seed's command-line values turned into rayrcm configs, and the
stage command line (``pretrain``, ``finetune``, ``certify``, ``analyze``).

The seed (Lei et al., "Robust Representation Consistency Model via Contrastive Denoising",
github.com/jiachenlei/rRCM) fine-tunes with ``rrcm_tune.py --task=consistency`` and the values
below; every conversion to rayrcm's units and names is written here, once:

* ``noise_aug`` is the noise std on data scaled to [-1, 1]: ``method.sigma = noise_aug / 2``
  (pixel units, data in [0, 1]); likewise the Karras ``sigma_min``/``sigma_max`` of pretraining.
* The fine-tuning configs set ``scale_lr=True``: the optimizer's lr is ``lr * batch_size / 256``.
* Epoch counts stay epochs (``train.epochs``, ``optim.warmup_epochs``, ``optim.schedule_epochs``;
  the seed's cosine always spans the config's ``total_training_steps`` epochs, even when a command
  trains fewer, e.g. 50 of 150 epochs for ImageNet at sigma 0.5). Our schedule is stepped per
  optimizer step, the seed's per epoch.
* ``augmentation_type``: the seed's CIFAR-10 "weak" is no augmentation at all (``none``), its
  ImageNet "weak" the short-side resize, centre crop and flip of ``ShortSideResizeCenterCrop``
  (``center``, flip), its "strong" a RandomResizedCrop(0.4, 1) and flip (``crop``), its "autoaug"
  timm's RandAugment ``rand-m9-mstd0.5-inc1`` pipeline (``autoaug``). Pretraining
  (``dataset.py``, ``augmentation_type="strong"`` on both datasets) uses MoCo v3's asymmetric pair
  and a centre-cropped, flipped ``x_start``: ``augmentation=mocov3`` with flips.
* ``nnet.hidden_dim`` is the width of the pretrained projection head (``model.proj_hidden_dim``);
  the fine-tuned classifier has a linear head on the encoder's features, as in the seed.
* ``train.layernorm`` (fine-tuning) decides whether the pretrained final LayerNorm is applied to
  the CLS token (``reload_forward``): ``model.final_norm``; no extra LayerNorm (``model.layernorm``).
* ``model.input_scale`` is ``c_in`` at the Karras level nearest the training noise on the grid the
  pretraining ended with (``find_nearest``; 81 levels for the seed's 300k / 600k-step runs).
* Pretraining: ``stop_grad_conv1`` and ``moco_initialization`` (ImageNet) are
  ``model.freeze_patch_embed`` and ``model.init=mocov3``; ``gradclip_method="after_warmup"`` is
  ``optim.clip_after_warmup``; the authors' ``AdamW(model.parameters())`` decays every parameter
  (``optim.weight_decay_all``).
* The seed picks its checkpoint by *test* accuracy; we hold out a validation split and select on
  ``val_acc_sigma_<sigma>``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rayrcm import recipe_cli
from rayrcm.config import ExperimentConfig, from_dict
from rayrcm.errors import ConfigError
from rayrcm.sections import short_sigma, sigma_alias

SIGMAS = (0.25, 0.5, 1.0)
# rrcm_tune.py: the pretraining grid is ema_scale_fn(pretrained steps) of the fine-tuning config's schedule
# (start_scales 20, end_scales 80, total_steps 600,000): 81 levels after 300k (CIFAR-10) or 600k (ImageNet) steps
# (rayrcm.objectives.rcm.num_levels(300_000, 600_000, 20, 80); a test checks it, torch stays unloaded for --help)
FINETUNE_GRID_LEVELS = 81
AUGMENTATION = {  # (dataset kind, seed augmentation_type) -> rayrcm data settings
    ("small", "weak"): {"augmentation": "none"},
    ("large", "weak"): {"augmentation": "center", "hflip": True},
    ("small", "strong"): {"augmentation": "crop", "crop_min": 0.4, "hflip": True},
    ("large", "strong"): {"augmentation": "crop", "crop_min": 0.4, "hflip": True},
    ("small", "autoaug"): {"augmentation": "autoaug", "autoaug": "rand-m9-mstd0.5-inc1", "hflip": True},
    ("large", "autoaug"): {"augmentation": "autoaug", "autoaug": "rand-m9-mstd0.5-inc1", "hflip": True},
}


def finetune_tree(cmd: dict[str, Any], conf: dict[str, Any], *, data: dict[str, Any], encoder: str,
                  register_as: str, experiment: str, workers: int, grid: dict[str, Any] | None = None) -> dict[str, Any]:
    """A config tree from one seed fine-tuning command (``cmd``) and its config file (``conf``);
    ``grid``: the pretraining's Karras grid for ``c_in`` (:func:`rcm_input_scale` keywords; default
    the seed's: 81 levels from 0.001 to 40)."""
    from rayrcm.objectives.rcm import (
        rcm_input_scale,  # torch: loaded when a config is built, not for --help
    )

    sigma = cmd["noise_aug"] / 2  # the seed's noise is on [-1, 1] data; ours on [0, 1] pixels
    kind = "large" if data["image_size"] >= 128 else "small"
    grid = grid or {"levels": FINETUNE_GRID_LEVELS}
    return {
        "data": {**data, **AUGMENTATION[(kind, cmd["augmentation_type"])], "batch_size": cmd["batch_size"],
                 "mixup": cmd["mixup"], "cutmix": cmd["cutmix"], "mixup_switch_prob": cmd.get("mixup_switch_prob", 0.5),
                 "label_smoothing": cmd["label_smoothing"], "crop_pct": 1.0 if kind == "large" else 0.875},
        "model": {"encoder": encoder, "patch_size": conf["patch_size"], "proj_hidden_dim": cmd.get("hidden_dim", conf["hidden_dim"]),
                  "proj_dim": conf["output_dim"], "final_norm": cmd["layernorm"], "layernorm": False,
                  "input_scale": rcm_input_scale(sigma, **grid)},
        "method": {"name": "consistency", "sigma": sigma, "m": 2, "lbd": cmd["lbd"], "eta": cmd["eta"], "train_head": False},
        "optim": {"name": cmd["optimizer"], "lr": cmd["lr"] * cmd["batch_size"] / 256 if conf["scale_lr"] else cmd["lr"],
                  "weight_decay": cmd["weight_decay"], "layer_decay": cmd["lr_layer_decay"],
                  "warmup_epochs": conf["warmup_epochs"], "schedule_epochs": conf["schedule_epochs"]},
        "train": {"name": f"{register_as}-finetune-sigma-{short_sigma(sigma)}", "epochs": cmd["epochs"], "workers": workers,
                  "use_gpu": True, "precision": "fp32", "eval_sigmas": SIGMAS, "select_metric": f"val_acc_sigma_{sigma:g}",
                  "checkpoint_epochs": 5},
        "tracking": {"experiment": experiment, "register_as": register_as, "alias": sigma_alias(sigma)},
    }


def pretrain_tree(conf: dict[str, Any], *, data: dict[str, Any], encoder: str, name: str, experiment: str,
                  workers: int) -> dict[str, Any]:
    """A config tree from one seed pretraining config file."""
    return {
        "data": {**data, "augmentation": "mocov3", "hflip": True, "batch_size": conf["batch_size"]},
        "model": {"encoder": encoder, "patch_size": conf["patch_size"], "proj_hidden_dim": conf["hidden_dim"],
                  "proj_dim": conf["output_dim"], "init": "mocov3" if conf["moco_initialization"] else "timm",
                  "freeze_patch_embed": conf["stop_grad_conv1"]},
        "method": {"name": "rcm", "temperature": conf["tau"], "sigma_min": conf["sigma_min"] / 2, "sigma_max": conf["sigma_max"] / 2,
                   "levels_start": conf["start_scales"], "levels_end": conf["end_scales"], "ema_start": conf["start_ema"],
                   "ema_end": conf["end_ema"], "ema_sharpness": conf["target_ema_A"]},
        "optim": {"name": "adamw", "lr": conf["lr"], "weight_decay": conf["weight_decay"], "warmup_steps": conf["warmup_steps"],
                  "grad_clip": conf["gradclip"], "clip_after_warmup": conf["gradclip_method"] == "after_warmup",
                  "weight_decay_all": True},
        "train": {"name": name, "steps": conf["steps"], "workers": workers, "use_gpu": True, "checkpoint_every": conf["save_interval"]},
        "tracking": {"experiment": experiment},
    }


def seed_sweep(cmd: dict[str, Any], random: bool = False):
    """The search around the seed's published values for one sigma (``cmd`` is its fine-tuning
    command): lambda (``lbd``) and eta halved and doubled, and the training noise (the seed's
    ``noise_aug / 2``) at the certification sigma and 25 % above it: 3 x 3 x 2 = 18 trials. With
    ``random``: 16 draws of lbd ~ loguniform(lbd/4, 4 lbd), eta ~ uniform(0, 2 eta),
    training sigma ~ uniform(s, 1.5 s). The certification sigma (the metric's) stays s."""
    from rayrcm.orchestration.sweep import SweepConfig

    s, lbd, eta = cmd["noise_aug"] / 2, cmd["lbd"], cmd["eta"]
    if random:
        space = {"method.lbd": f"loguniform:{lbd / 4:g},{lbd * 4:g}", "method.eta": f"uniform:0,{2 * eta:g}",
                 "method.sigma": f"uniform:{s:g},{1.5 * s:g}"}
        return SweepConfig(space=space, num_samples=16)
    space = {"method.lbd": f"grid:{lbd / 2:g},{lbd:g},{lbd * 2:g}", "method.eta": f"grid:{eta / 2:g},{eta:g},{eta * 2:g}",
             "method.sigma": f"grid:{s:g},{1.25 * s:g}"}
    return SweepConfig(space=space)


def certify_args(register_as: str, sigma: float, dataset: str, skip: int, max_index: int = -1) -> list[str]:
    """The papers' protocol: n0 = 100, n = 100,000, alpha = 0.001, every ``skip``-th test image
    below index ``max_index`` (-1: all)."""
    return [f"model=models:/{register_as}@{sigma_alias(sigma)}", f"dataset={dataset}", f"smoothing.sigma={sigma}",
            "smoothing.n0=100", "smoothing.n=100000", "smoothing.alpha=0.001", f"smoothing.skip={skip}",
            f"smoothing.max={max_index}", "compute.use_gpu=true", "compute.precision=fp32"]


SIZE_NAMES = {"b": "RCM-B", "s": "RCM-S"}
STAGE_EXAMPLES = {  # {prog}: this recipe's path
    "pretrain": "python {prog} pretrain --set data.path=DIR [--set train.use_gpu=true]",
    "finetune": "python {prog} finetune --sigma 0.25 --set data.path=DIR --set model.init_from=<pretrain run id>",
    "tune": "python {prog} tune --sigma 0.25 --set model.init_from=<pretrain run id> --sweep max_concurrent_trials=4",
    "certify": "python {prog} certify --sigma 0.25 --set smoothing.n=10000 [--set data_path=DIR]",
    "analyze": "python {prog} analyze rayrcm_results/certify/<job> [more results ...]",
    "all": "python {prog} all [--sigmas 0.25,0.5,1.0] [--set finetune-0.25:optim.lr=1e-3] [--dry-run]",
}
HELPS = {"pretrain": "RCM contrastive-denoising pretraining of the encoder (Ray Train)",
         "finetune": "consistency fine-tuning of a classifier at one sigma (Ray Train)",
         "tune": "a Ray Tune sweep around the seed's fine-tuning values (ASHA, MLflow parent/child runs)",
         "certify": "randomized-smoothing certification of the registered model (Ray Data)",
         "all": "the whole table in one resumable job: pretrain, fine-tune and certify at each sigma, the table"}


def table_stages(pretrain: Callable[[], ExperimentConfig], finetune: Callable[[float], ExperimentConfig],
                 certify: Callable[[float], list[str]], sigmas: tuple[float, ...]) -> list:
    """The RCM table as stages: pretraining, then at each sigma a consistency fine-tuning from it and
    the certification of that model (one row per sigma)."""
    from functools import partial

    from rayrcm.orchestration.certify_job import config_from_args
    from rayrcm.pipeline import Stage

    out = [Stage("pretrain", "train", pretrain)]
    for s in sigmas:
        out.append(Stage(f"finetune-{s:g}", "train", partial(finetune, s), inputs={"model.init_from": "pretrain"}))
        out.append(Stage(f"certify-{s:g}", "certify", partial(lambda x: config_from_args(certify(x)), s),
                            inputs={"model": f"finetune-{s:g}"}, row=f"sigma={s:g}"))
    return out


def _sigmas(text: str) -> tuple[float, ...]:
    try:
        sigmas = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ConfigError("--sigmas", text, "must be comma-separated numbers, e.g. 0.25,0.5,1") from None
    bad = [x for x in sigmas if x not in SIGMAS]
    if bad or not sigmas:
        raise ConfigError("--sigmas", text, f"each must be one of {', '.join(f'{x:g}' for x in SIGMAS)} (the seed's)")
    return sigmas


def commands(*, pretrain: Callable[[str], ExperimentConfig], finetune: Callable[[float], ExperimentConfig],
             certify: Callable[[float], list[str]], sweep: Callable[[float, bool], Any] | None = None,
             sizes: tuple[str, ...] = ("b",), recipe: str = "rcm") -> list[recipe_cli.Command]:
    """``pretrain [--size]``, ``finetune --sigma``, ``tune --sigma [--random]`` (with ``sweep``),
    ``certify --sigma``, ``analyze RESULTS...``, ``all [--sigmas]`` (:mod:`rayrcm.recipe_cli`)."""
    sigma = recipe_cli.option("--sigma", type=float, default=0.25, choices=SIGMAS,
                              help="noise level in pixel units, data in [0, 1] (default 0.25)")
    size = recipe_cli.option("--size", default=sizes[0], choices=sizes,
                             help="model size: " + " or ".join(f"{SIZE_NAMES.get(z, z)} ({z})" for z in sizes))
    out = [recipe_cli.train("pretrain", HELPS["pretrain"], lambda a: pretrain(a.size), example=STAGE_EXAMPLES["pretrain"],
                            options=[size]),
           recipe_cli.train("finetune", HELPS["finetune"], lambda a: finetune(a.sigma), example=STAGE_EXAMPLES["finetune"],
                            options=[sigma])]
    if sweep is not None:
        random = recipe_cli.option("--random", action="store_true", help="the random/loguniform space instead of the grid")
        out.append(recipe_cli.tune(HELPS["tune"], lambda a: finetune(a.sigma), lambda a: sweep(a.sigma, a.random),
                                   example=STAGE_EXAMPLES["tune"], options=[sigma, random]))
    out.append(recipe_cli.certify(HELPS["certify"], lambda a: certify(a.sigma), example=STAGE_EXAMPLES["certify"],
                                  options=[sigma]))
    out.append(recipe_cli.analyze(example=STAGE_EXAMPLES["analyze"]))
    sigmas = recipe_cli.option("--sigmas", default=",".join(f"{x:g}" for x in SIGMAS),
                               help="the table's noise levels, comma-separated (default 0.25,0.5,1)")
    out.append(recipe_cli.table(recipe, lambda a: table_stages(lambda: pretrain(sizes[0]), finetune, certify,
                                                               _sigmas(a.sigmas)),
                                example=STAGE_EXAMPLES["all"], names="pretrain, finetune-<sigma>, certify-<sigma>",
                                options=[sigmas], help=HELPS["all"]))
    return out


__all__ = ["SIGMAS", "certify_args", "commands", "finetune_tree", "from_dict", "pretrain_tree", "table_stages"]
