"""The sections of an experiment config as typed, frozen dataclasses, and their own checks.

This module knows no registry (datasets, encoders, objectives and evaluations import it), so
imports flow one way; :mod:`rayrcm.config` sits above the registries and adds the checks that need
them. Values are in the units of the whole package: pixels in [0, 1], sigmas in pixel units.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Protocol

from rayrcm.errors import MAX_NAME, MAX_SEED, ConfigError

AUGMENTATIONS = ("none", "weak", "crop", "strong", "autoaug", "simclr", "mocov3", "mocov3_1", "mocov3_2", "center")
PRECISIONS = ("fp32", "bf16", "fp16")
PLACEMENTS = ("PACK", "SPREAD")  # Ray Train's placement of a job's workers over the nodes
OPTIMIZERS = ("adamw", "adam", "sgd", "lamb", "lars")


STORAGE_ENV = "RAYRCM_STORAGE"


def default_storage(sub: str = "") -> str:
    """Where checkpoints and results go when a config does not say: ``$RAYRCM_STORAGE`` (set on
    every node of a cluster to a shared path, e.g. an EFS mount) or ``./rayrcm_results``. A
    ``ray job submit`` entrypoint runs in a temporary copy of the working dir, so relative paths
    would be lost there."""
    root = os.environ.get(STORAGE_ENV) or "./rayrcm_results"
    return f"{root.rstrip('/')}/{sub}" if sub else root


def default_tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI`` (set on a cluster to its MLflow server) or ``sqlite:///mlflow.db``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"


@dataclass(frozen=True)
class DataConfig:
    """Dataset and input pipeline. Images are [0, 1] tensors; ``batch_size`` is global (all workers)."""

    name: str = "digits"
    path: str | None = None
    image_size: int = 0  # 0: the dataset's native size (digits 16, CIFAR 32, imagefolder 224; rayrcm.data.native)
    augmentation: str = "weak"  # none | weak | crop | strong | autoaug | simclr | mocov3 | mocov3_1 | mocov3_2 | center (rayrcm.data.views.build_transform)
    hflip: bool = False
    crop_pct: float = 0.875  # large images: resize the short side to image_size / crop_pct, centre crop
    crop_min: float = 0.4  # smallest area fraction of the "crop" augmentation
    autoaug: str = "rand-m9-mstd0.5-inc1"  # timm RandAugment policy of the "autoaug" augmentation
    batch_size: int = 128
    num_workers: int = 0
    val_fraction: float = 0.1
    mixup: float = 0.0
    cutmix: float = 0.0
    mixup_switch_prob: float = 0.5
    label_smoothing: float = 0.0
    folders: tuple[str, ...] = ()  # caption_groups: image roots, one per generation seed (StableRep's --folder_list)
    texture_path: str | None = None  # imagefolder: <split>/<wnid>/<name>.png per photo (moco negatives=texture)


@dataclass(frozen=True)
class ModelConfig:
    """Encoder, heads and the classifier's fixed input transform."""

    encoder: str = "vit_digits"
    patch_size: int = 0  # 0: the encoder's default
    proj_hidden_dim: int = 512
    proj_dim: int = 256
    head_hidden_dim: int = 0  # 0: linear head
    final_norm: bool = True  # ViT: the pretrained final LayerNorm on the CLS token (the RCM authors' fine-tuning "layernorm"); False: the CLS token before it
    layernorm: bool = False  # extra, freshly initialised LayerNorm before the head (older rayrcm; files trained with it)
    input_scale: float = 1.0  # fixed factor after normalization (RCM preconditioning c_in)
    init_from: str | None = None  # encoder weights: registry URI, run id or checkpoint path
    init: str = "timm"  # ViT weight init: timm | mocov3 (MoCo v3's, as the RCM authors' moco_initialization)
    freeze_patch_embed: bool = False  # ViT patch embedding frozen at its init (MoCo v3's / RCM's stop_grad_conv1)
    input_resize: int = 0  # classifier: bicubic resize of its input, encoder built for it (FT-CADIS 32 -> 224); 0 = off
    lora_rank: int = 0  # ViT: freeze the encoder, train LoRA of this rank on q and v of every block (+ head); 0 = off
    lora_alpha: float = 4.0  # LoRA scale alpha / lora_rank (FT-CADIS ImageNet: r = alpha = 4)


@dataclass(frozen=True)
class OptimConfig:
    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    nesterov: bool = False  # sgd: Nesterov momentum (torch's and most seeds' default is plain momentum)
    betas: tuple[float, ...] = (0.9, 0.999)  # adam, adamw, lamb: torch's default (StableRep's README: 0.9, 0.98)
    layer_decay: float = 1.0  # 1.0 = off
    # how layer decay counts a ViT's layers: "mae" (MAE/BEiT, the RCM and FT-CADIS authors' param_groups_lrd:
    # block i of depth D at decay^(D - i), the last block at decay, head and final norm at 1) or "timm"
    # (timm's param_groups_layer_decay: the last block at 1 with the head)
    layer_decay_style: str = "mae"
    warmup_steps: int = 0
    min_lr: float = 0.0
    grad_clip: float = 0.0  # 0 = off
    # global: the norm of all gradients together (torch's clip_grad_norm_); per_param: each parameter's gradient
    # to norm <= grad_clip on its own (FT-CADIS's utils.clip_gradients, from DINO)
    clip_mode: str = "global"
    schedule_steps: int = 0  # length of warmup + cosine; 0 = train.steps (more: the cosine is cut short)
    warmup_epochs: float = 0.0  # > 0: sets warmup_steps from the training set size (see resolve_epochs)
    schedule_epochs: float = 0.0  # > 0: sets schedule_steps likewise
    schedule: str = "cosine"  # cosine (warmup + cosine) | step (warmup + multiply by gamma at each milestone)
    milestones: tuple[int, ...] = ()  # steps where the "step" schedule decays
    milestone_epochs: tuple[float, ...] = ()  # the same in epochs (sets milestones; see resolve_epochs)
    gamma: float = 0.1
    clip_after_warmup: bool = False  # grad_clip only once the warm-up is over (the RCM authors' "after_warmup")
    schedule_offset: int = 0  # update s uses the schedule at s + offset (1: the ACL authors step LambdaLR before each update)
    weight_decay_all: bool = False  # every parameter decays (the RCM and ACL authors); False: biases and norms at 0
    weight_decay_end: float = -1.0  # >= 0: decaying groups follow a per-step cosine weight_decay -> this (FT-CADIS)


@dataclass(frozen=True)
class TrainConfig:
    name: str = ""  # job name; rerunning the same name resumes. Default: <experiment>-<method>
    steps: int = 200
    epochs: float = 0.0  # > 0: steps = ceil(epochs * floor(train images / global batch)) (resolve_epochs)
    workers: int = 1  # Ray Train workers; 0 runs the loop in the driver process
    placement: str = "PACK"  # PACK: as few nodes as fit the workers; SPREAD: one worker per node where there is room
    use_gpu: bool = False
    precision: str = "fp32"
    accum_iter: int = 1  # micro-batches of data.batch_size per optimizer step (gradient accumulation)
    checkpoint_every: int = 50
    checkpoint_epochs: float = 0.0  # > 0: sets checkpoint_every from the training set size
    keep_checkpoints: int = 2
    max_failures: int = 1
    sync_bn: bool = True  # several workers: BatchNorm statistics over the global batch (SyncBatchNorm on GPUs)
    seed: int = 0
    log_every: int = 10
    storage_path: str = field(default_factory=lambda: default_storage())  # $RAYRCM_STORAGE on a cluster
    eval_sigmas: tuple[float, ...] = (0.25, 0.5)  # noise levels of the "noisy" and "smoothed" evaluations
    eval_votes: int = 1  # noise draws per image of the "smoothed" evaluation (majority vote)
    # the "certified" evaluation: sequential certification at eval_sigmas, deciding these radii per image
    # within eval_max_n draws (a multiple of 100) at confidence 1 - eval_alpha (rayrcm.eval.certified)
    eval_radii: tuple[float, ...] = (0.0, 0.25)
    eval_max_n: int = 2000
    eval_alpha: float = 0.001
    evals: tuple[str, ...] = ("noisy",)  # evaluations (rayrcm.eval.EVALUATIONS) on the validation split at each checkpoint
    test_evals: tuple[str, ...] = ("noisy",)  # evaluations on the test split after training (plus the method's own)
    encoder_evals: tuple[str, ...] = ("knn",)  # an encoder (pretraining) stage's evaluations: validation and test splits
    knn_k: int = 20  # the "knn" evaluation: neighbours, temperature of their exp(cos / T) votes (solo-learn's defaults)
    knn_temperature: float = 0.07
    knn_bank: int = 0  # reference images from the training split, evenly spread (0 = all of it)
    embedding_points: int = 2000  # an encoder stage's 2-D t-SNE plot of the test features (0 = no plot)
    select_metric: str = ""  # keep the checkpoint best on this validation metric (e.g. val_acc_sigma_0.25); "" = last
    plugins: tuple[str, ...] = ()  # modules or .py files imported first (driver and workers): your registered extensions
    progress_every_s: float = 10.0  # at most one console progress line per this many seconds (the last step always)
    fault_at_step: int = -1  # test hook: fail once at this step (first attempt only)
    fault_mode: str = "raise"  # test hook: raise before the step, or exit (the worker process dies) right after its report


@dataclass(frozen=True)
class TrackingConfig:
    uri: str = field(default_factory=lambda: default_tracking_uri())  # $MLFLOW_TRACKING_URI on a cluster
    experiment: str = "rayrcm"
    register_as: str = ""  # registered model name; empty: do not register
    alias: str = ""
    system_metrics: bool = False
    enabled: bool = True
    flush_timeout_s: float = 30.0  # at the end, how long rank 0 waits for buffered metrics to reach the server


class Experiment(Protocol):
    """What the pure layers (objectives, evaluations, the training session) read of a whole
    experiment config. :class:`rayrcm.config.ExperimentConfig` is the one implementation; the pure
    layers name this type so that no module under the config's registries imports back up."""

    @property
    def data(self) -> DataConfig: ...
    @property
    def model(self) -> ModelConfig: ...
    @property
    def method(self) -> Any: ...  # the objective's own config dataclass
    @property
    def optim(self) -> OptimConfig: ...
    @property
    def train(self) -> TrainConfig: ...
    @property
    def tracking(self) -> TrackingConfig: ...
    @property
    def job_name(self) -> str: ...


def check(ok: bool, key: str, value: object, allowed: str) -> None:
    if not ok:
        raise ConfigError(key, value, allowed)


def check_data(d: DataConfig) -> None:
    check(d.image_size >= 4, "data.image_size", d.image_size, "must be >= 4 (or 0: the dataset's native size)")
    check(d.augmentation in AUGMENTATIONS, "data.augmentation", d.augmentation, f"choose one of: {', '.join(AUGMENTATIONS)}")
    check(d.batch_size >= 1, "data.batch_size", d.batch_size, "must be >= 1")
    check(0 < d.crop_pct <= 1, "data.crop_pct", d.crop_pct, "must be in (0, 1]")
    check(0 < d.crop_min <= 1, "data.crop_min", d.crop_min, "must be in (0, 1]")
    check(d.num_workers >= 0, "data.num_workers", d.num_workers, "must be >= 0")
    check(0.0 <= d.val_fraction < 1.0, "data.val_fraction", d.val_fraction, "must be in [0, 1)")
    for key in ("mixup", "cutmix"):
        check(getattr(d, key) >= 0, f"data.{key}", getattr(d, key), "must be >= 0 (0 = off)")
    check(0 <= d.mixup_switch_prob <= 1, "data.mixup_switch_prob", d.mixup_switch_prob, "must be in [0, 1]")
    check(0 <= d.label_smoothing < 1, "data.label_smoothing", d.label_smoothing, "must be in [0, 1)")
    for i, root in enumerate(d.folders):
        check(bool(root.strip()), "data.folders", root, "every root folder must be a non-empty path")
        check(root not in d.folders[:i], "data.folders", root, "is listed twice: each root is one generation seed")
    check(d.texture_path is None or bool(d.texture_path.strip()), "data.texture_path", d.texture_path,
          "must be a folder path (or unset)")


def check_model(m: ModelConfig, image_size: int) -> None:
    check(m.patch_size >= 0, "model.patch_size", m.patch_size, "must be >= 0 (0 = encoder default)")
    check(m.input_resize == 0 or 4 <= m.input_resize <= 4096, "model.input_resize", m.input_resize,
          "must be 4 to 4096 pixels (or 0: off)")
    if m.patch_size:
        size, key = (m.input_resize, "model.input_resize") if m.input_resize else (image_size, "data.image_size")
        check(size % m.patch_size == 0, "model.patch_size", m.patch_size, f"must divide {key}={size}")
    check(m.lora_rank >= 0, "model.lora_rank", m.lora_rank, "must be >= 0 (0 = off)")
    check(math.isfinite(m.lora_alpha) and m.lora_alpha > 0, "model.lora_alpha", m.lora_alpha, "must be > 0")
    for key in ("proj_hidden_dim", "proj_dim"):
        check(getattr(m, key) >= 1, f"model.{key}", getattr(m, key), "must be >= 1")
    check(m.input_scale > 0, "model.input_scale", m.input_scale, "must be > 0")
    check(m.init in ("timm", "mocov3"), "model.init", m.init, "choose one of: timm, mocov3")
    check(m.head_hidden_dim >= 0, "model.head_hidden_dim", m.head_hidden_dim, "must be >= 0 (0 = linear head)")


def check_optim(o: OptimConfig) -> None:
    check(o.name in OPTIMIZERS, "optim.name", o.name, f"choose one of: {', '.join(OPTIMIZERS)}")
    check(o.lr > 0, "optim.lr", o.lr, "must be > 0")
    check(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas", o.betas, "two numbers in [0, 1), e.g. 0.9,0.98")
    check(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "must be >= 0")
    check(o.weight_decay_end == -1 or o.weight_decay_end >= 0, "optim.weight_decay_end", o.weight_decay_end,
          "must be >= 0 (a cosine from optim.weight_decay to it), or -1 for a constant weight decay")
    check(0 < o.layer_decay <= 1, "optim.layer_decay", o.layer_decay, "must be in (0, 1] (1 = off)")
    check(o.layer_decay_style in ("mae", "timm"), "optim.layer_decay_style", o.layer_decay_style, "choose one of: mae, timm")
    check(o.warmup_steps >= 0, "optim.warmup_steps", o.warmup_steps, "must be >= 0")
    check(0 <= o.min_lr <= o.lr, "optim.min_lr", o.min_lr, f"must be in [0, optim.lr={o.lr}]")
    check(not (o.weight_decay_all and o.layer_decay < 1), "optim.weight_decay_all", o.weight_decay_all,
          "cannot be combined with optim.layer_decay < 1 (layer decay keeps biases and norms undecayed)")
    check(o.grad_clip >= 0, "optim.grad_clip", o.grad_clip, "must be >= 0 (0 = off)")
    check(o.clip_mode in ("global", "per_param"), "optim.clip_mode", o.clip_mode, "choose one of: global, per_param")
    check(o.schedule in ("cosine", "step"), "optim.schedule", o.schedule, "choose one of: cosine, step")
    check(0 < o.gamma <= 1, "optim.gamma", o.gamma, "must be in (0, 1]")
    for key in ("milestones", "milestone_epochs"):
        values = list(getattr(o, key))
        check(all(v > 0 for v in values) and values == sorted(values), f"optim.{key}", getattr(o, key), "must be positive and increasing")
    for key in ("warmup_epochs", "schedule_epochs", "schedule_steps", "schedule_offset"):
        check(getattr(o, key) >= 0, f"optim.{key}", getattr(o, key), "must be >= 0")


def check_job_name(key: str, name: str) -> None:
    """A job's folder under the results folder is one path component: ASCII letters, digits,
    ``-``, ``_``, ``.`` (not ``.`` or ``..``). Training and certification jobs alike."""
    import re

    check(re.fullmatch(r"[A-Za-z0-9_.-]+", name) is not None and name not in (".", ".."), key, name,
          "must be one path component: letters, digits, '-', '_', '.' (not '.' or '..')")
    check(len(name) <= MAX_NAME, key, name[:40] + "...", f"is {len(name)} characters; at most {MAX_NAME} (a folder name)")


def check_train(t: TrainConfig) -> None:
    if t.name:
        check_job_name("train.name", t.name)
    check(1 <= t.steps <= 10**10, "train.steps", t.steps, "must be >= 1 and <= 10^10")
    check(0 <= t.seed <= MAX_SEED, "train.seed", t.seed, "must be >= 0 and < 2^63 (a 64-bit seed)")
    check(t.epochs >= 0, "train.epochs", t.epochs, "must be >= 0 (0 = use train.steps)")
    check(t.checkpoint_epochs >= 0, "train.checkpoint_epochs", t.checkpoint_epochs, "must be >= 0")
    check(t.eval_votes >= 1, "train.eval_votes", t.eval_votes, "must be >= 1")
    check(t.workers >= 0, "train.workers", t.workers, "must be >= 0 (0 = run in the driver)")
    check(t.placement in PLACEMENTS, "train.placement", t.placement, f"choose one of: {', '.join(PLACEMENTS)}")
    check(t.precision in PRECISIONS, "train.precision", t.precision, f"choose one of: {', '.join(PRECISIONS)}")
    check(t.checkpoint_every >= 1, "train.checkpoint_every", t.checkpoint_every, "must be >= 1")
    check(t.fault_mode in ("raise", "exit"), "train.fault_mode", t.fault_mode, "choose one of: raise, exit")
    check(t.keep_checkpoints >= 1, "train.keep_checkpoints", t.keep_checkpoints, "must be >= 1")
    check(t.max_failures >= -1, "train.max_failures", t.max_failures, "must be >= 0, or -1 for unlimited")
    check(t.log_every >= 1, "train.log_every", t.log_every, "must be >= 1")
    check(t.accum_iter >= 1, "train.accum_iter", t.accum_iter, "must be >= 1 (1 = no gradient accumulation)")
    check(t.progress_every_s >= 0, "train.progress_every_s", t.progress_every_s, "must be >= 0 (0 = every logged step)")
    for s in t.eval_sigmas:
        check(s > 0, "train.eval_sigmas", s, "every sigma must be > 0 (pixel units, data in [0, 1])")
    check(t.knn_k >= 1, "train.knn_k", t.knn_k, "must be >= 1")
    check(t.knn_temperature > 0, "train.knn_temperature", t.knn_temperature, "must be > 0")
    check(t.knn_bank >= 0, "train.knn_bank", t.knn_bank, "must be >= 0 (0 = the whole training split)")
    check(t.embedding_points >= 0, "train.embedding_points", t.embedding_points, "must be >= 0 (0 = no plot)")
    check_certified_eval(t)


def check_certified_eval(t: TrainConfig) -> None:
    """The ``certified`` evaluation's settings (checked whether or not it is chosen: they are cheap to check)."""
    check(0 < t.eval_alpha < 1, "train.eval_alpha", t.eval_alpha, "must be in (0, 1)")
    check(t.eval_max_n >= 100 and t.eval_max_n % 100 == 0, "train.eval_max_n", t.eval_max_n,
          "must be a positive multiple of 100 (one look per 100 draws)")
    radii = t.eval_radii
    check(len(radii) > 0 and all(r >= 0 for r in radii), "train.eval_radii", radii, "give radii >= 0, e.g. 0,0.25")
    check(all(a < b for a, b in zip(radii, radii[1:])), "train.eval_radii", radii, "must be increasing, each once")
    if t.eval_sigmas and "certified" in (*t.evals, *t.test_evals):
        from rayrcm.certify.sequential import reach

        top = min(reach(t.eval_max_n, t.eval_alpha, s) for s in t.eval_sigmas)
        check(radii[-1] < top, "train.eval_radii", radii,
              f"beyond what train.eval_max_n={t.eval_max_n} draws can certify at sigma {min(t.eval_sigmas):g}: every radius "
              f"must be < {top:.4f} (raise train.eval_max_n)")


def check_tracking(tr: TrackingConfig) -> None:
    check(bool(tr.experiment), "tracking.experiment", tr.experiment, "must not be empty")
    check(all(c.isalnum() or c in "-_" for c in tr.alias), "tracking.alias", tr.alias, "MLflow aliases use letters, digits, '_' and '-' only (e.g. sigma-0_50)")
    check(not tr.alias or bool(tr.register_as), "tracking.alias", tr.alias, "needs tracking.register_as")
    check(tr.flush_timeout_s >= 0, "tracking.flush_timeout_s", tr.flush_timeout_s, "must be >= 0")


def short_sigma(sigma: float) -> str:
    """A sigma in names: 0.25 -> ``0_25`` (job names; MLflow aliases allow only letters, digits, '_' and '-')."""
    return f"{sigma:.2f}".replace(".", "_")


def sigma_alias(sigma: float) -> str:
    """The registry alias of a model trained at ``sigma``: 0.25 -> ``sigma-0_25``."""
    return f"sigma-{short_sigma(sigma)}"
