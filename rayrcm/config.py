"""Typed, frozen experiment configs: loaded from a Python or YAML recipe, overridden with dotted keys.

One convention everywhere: ``--set section.key=value`` (repeatable). ``method`` is the config
dataclass of the chosen objective, so ``--set method.name=gaussian --set method.sigma=0.5`` works.
Every value is validated by :func:`validate` before any Ray work starts; errors are
:class:`~rayrcm.errors.ConfigError` with a one-line message.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import typing
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

from rayrcm.errors import ConfigError

AUGMENTATIONS = ("none", "weak", "crop", "strong", "autoaug", "simclr")
PRECISIONS = ("fp32", "bf16", "fp16")


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
    image_size: int = 16
    augmentation: str = "weak"  # none | weak | crop | strong | autoaug | simclr (rayrcm.data.views.build_transform)
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


@dataclass(frozen=True)
class ModelConfig:
    """Encoder, heads and the classifier's fixed input transform."""

    encoder: str = "vit_digits"
    patch_size: int = 0  # 0: the encoder's default
    proj_hidden_dim: int = 512
    proj_dim: int = 256
    head_hidden_dim: int = 0  # 0: linear head
    layernorm: bool = False  # extra LayerNorm on features before the head
    input_scale: float = 1.0  # fixed factor after normalization (RCM preconditioning c_in)
    init_from: str | None = None  # encoder weights: registry URI, run id or checkpoint path


@dataclass(frozen=True)
class OptimConfig:
    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    layer_decay: float = 1.0  # 1.0 = off
    warmup_steps: int = 0
    min_lr: float = 0.0
    grad_clip: float = 0.0  # 0 = off
    schedule_steps: int = 0  # length of warmup + cosine; 0 = train.steps (more: the cosine is cut short)
    warmup_epochs: float = 0.0  # > 0: sets warmup_steps from the training set size (see resolve_epochs)
    schedule_epochs: float = 0.0  # > 0: sets schedule_steps likewise
    schedule: str = "cosine"  # cosine (warmup + cosine) | step (warmup + multiply by gamma at each milestone)
    milestones: tuple[int, ...] = ()  # steps where the "step" schedule decays
    milestone_epochs: tuple[float, ...] = ()  # the same in epochs (sets milestones; see resolve_epochs)
    gamma: float = 0.1


@dataclass(frozen=True)
class TrainConfig:
    name: str = ""  # job name; rerunning the same name resumes. Default: <experiment>-<method>
    steps: int = 200
    epochs: float = 0.0  # > 0: steps = ceil(epochs * floor(train images / global batch)) (resolve_epochs)
    workers: int = 1  # Ray Train workers; 0 runs the loop in the driver process
    use_gpu: bool = False
    precision: str = "fp32"
    checkpoint_every: int = 50
    checkpoint_epochs: float = 0.0  # > 0: sets checkpoint_every from the training set size
    keep_checkpoints: int = 2
    max_failures: int = 1
    seed: int = 0
    log_every: int = 10
    storage_path: str = field(default_factory=lambda: default_storage())  # $RAYRCM_STORAGE on a cluster
    eval_sigmas: tuple[float, ...] = (0.25, 0.5)
    eval_votes: int = 1  # > 1: also val_smoothed_acc_sigma_<s>, the majority vote of this many noise draws
    select_metric: str = ""  # keep the checkpoint best on this validation metric (e.g. val_acc_sigma_0.25); "" = last
    fault_at_step: int = -1  # test hook: raise once at this step (first attempt only)


@dataclass(frozen=True)
class TrackingConfig:
    uri: str = field(default_factory=lambda: default_tracking_uri())  # $MLFLOW_TRACKING_URI on a cluster
    experiment: str = "rayrcm"
    register_as: str = ""  # registered model name; empty: do not register
    alias: str = ""
    system_metrics: bool = False
    enabled: bool = True


@dataclass(frozen=True)
class ExperimentConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: Any = None  # the objective's own config dataclass (see rayrcm.objectives)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        if self.method is None:
            from rayrcm.objectives import method_config_class

            object.__setattr__(self, "method", method_config_class("rcm")())

    @property
    def job_name(self) -> str:
        return self.train.name or f"{self.tracking.experiment}-{self.method.name}"


# ----------------------------------------------------------------------------- parsing values


def _parse_scalar(key: str, raw: str, typ: Any) -> Any:
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        if raw.lower() in ("none", "null", ""):
            return None
        inner = [a for a in args if a is not type(None)]
        return _parse_scalar(key, raw, inner[0])
    if origin is tuple:
        return tuple(_parse_scalar(key, p.strip(), args[0]) for p in raw.split(",") if p.strip())
    try:
        if typ is bool:
            low = raw.lower()
            if low in ("true", "1", "yes", "on"):
                return True
            if low in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if typ is int:
            return int(raw)
        if typ is float:
            return float(raw)
    except ValueError:
        raise ConfigError(key, raw, f"expected a value of type {typ.__name__}") from None
    return raw


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Coerce a YAML/Python value (or a string from the command line) to the field's type."""
    if isinstance(value, str):
        return _parse_scalar(key, value, typ)
    origin = typing.get_origin(typ)
    if origin is tuple and isinstance(value, (list, tuple)):
        return tuple(value)
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _set_fields(obj: Any, section: str, values: dict[str, Any]) -> Any:
    hints = _hints(type(obj))
    names = {f.name for f in fields(obj)}
    changes = {}
    for key, value in values.items():
        if key not in names:
            raise ConfigError(
                f"{section}.{key}", value, f"unknown key; {section} has: {', '.join(sorted(names))}"
            )
        changes[key] = _coerce(f"{section}.{key}", value, hints[key])
    return replace(obj, **changes)


def from_dict(tree: dict[str, Any], base: ExperimentConfig | None = None) -> ExperimentConfig:
    """Build a config from a nested dict (a YAML recipe), on top of ``base`` or the defaults."""
    from rayrcm.objectives import method_config_class

    cfg = base or ExperimentConfig()
    sections = {f.name for f in fields(ExperimentConfig)}
    for name, values in tree.items():
        if name not in sections:
            raise ConfigError(name, values, f"unknown section; sections are: {', '.join(sorted(sections))}")
        if not isinstance(values, dict):
            raise ConfigError(name, values, "expected a mapping of keys to values")
        current = getattr(cfg, name)
        if name == "method" and "name" in values and values["name"] != current.name:
            try:
                current = method_config_class(values["name"])()
            except KeyError as err:
                raise ConfigError("method.name", values["name"], err.args[0]) from None
        cfg = replace(cfg, **{name: _set_fields(current, name, values)})
    return cfg


def parse_overrides(items: list[str]) -> dict[str, dict[str, str]]:
    """``["optim.lr=2e-4", "method.name=gaussian"]`` -> ``{"optim": {"lr": "2e-4"}, ...}``."""
    tree: dict[str, dict[str, str]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        section, dot, leaf = key.strip().partition(".")
        if not sep or not dot or not leaf:
            raise ConfigError(item, item, "overrides look like section.key=value")
        tree.setdefault(section, {})
        # method.name first, so the other method keys land in the right dataclass
        if leaf == "name" and section == "method":
            tree[section] = {"name": value, **{k: v for k, v in tree[section].items() if k != "name"}}
        else:
            tree[section][leaf] = value
    return tree


def apply_overrides(cfg: ExperimentConfig, items: list[str]) -> ExperimentConfig:
    return from_dict(parse_overrides(items), cfg)


# ----------------------------------------------------------------------------- recipes


def load_recipe(path: str | os.PathLike[str]) -> ExperimentConfig:
    """Load ``.yaml``/``.yml`` (nested mapping) or ``.py`` (a ``config()`` function or ``CONFIG``)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError("recipe", str(path), "no such file")
    if p.suffix in (".yaml", ".yml"):
        import yaml

        tree = yaml.safe_load(p.read_text()) or {}
        if not isinstance(tree, dict):
            raise ConfigError("recipe", str(path), "a YAML recipe is a mapping of sections")
        return from_dict(tree)
    if p.suffix == ".py":
        spec = importlib.util.spec_from_file_location(f"rayrcm_recipe_{p.stem}", p)
        assert spec and spec.loader
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        value = module.config() if hasattr(module, "config") else getattr(module, "CONFIG", None)
        if isinstance(value, dict):
            return from_dict(value)
        if isinstance(value, ExperimentConfig):
            return value
        raise ConfigError("recipe", str(path), "a Python recipe defines config() or CONFIG")
    raise ConfigError("recipe", str(path), "recipes are .py, .yaml or .yml files")


# ----------------------------------------------------------------------------- validation


def _check(ok: bool, key: str, value: object, allowed: str) -> None:
    if not ok:
        raise ConfigError(key, value, allowed)


def validate(cfg: ExperimentConfig, *, check_paths: bool = True) -> ExperimentConfig:
    """Check every value; raise a one-line :class:`ConfigError` on the first bad one."""
    from rayrcm.data import DATASETS
    from rayrcm.models import ENCODERS

    d, m, o, t, tr = cfg.data, cfg.model, cfg.optim, cfg.train, cfg.tracking
    _check(d.name in DATASETS, "data.name", d.name, f"unknown dataset; choose one of: {', '.join(DATASETS.names())}")
    if check_paths:
        DATASETS.get(d.name).check_path(d.path)
    _check(d.image_size >= 4, "data.image_size", d.image_size, "must be >= 4")
    _check(d.augmentation in AUGMENTATIONS, "data.augmentation", d.augmentation, f"choose one of: {', '.join(AUGMENTATIONS)}")
    _check(d.batch_size >= 1, "data.batch_size", d.batch_size, "must be >= 1")
    _check(0 < d.crop_pct <= 1, "data.crop_pct", d.crop_pct, "must be in (0, 1]")
    _check(0 < d.crop_min <= 1, "data.crop_min", d.crop_min, "must be in (0, 1]")
    _check(d.num_workers >= 0, "data.num_workers", d.num_workers, "must be >= 0")
    _check(0.0 <= d.val_fraction < 1.0, "data.val_fraction", d.val_fraction, "must be in [0, 1)")
    for key in ("mixup", "cutmix"):
        _check(getattr(d, key) >= 0, f"data.{key}", getattr(d, key), "must be >= 0 (0 = off)")
    _check(0 <= d.mixup_switch_prob <= 1, "data.mixup_switch_prob", d.mixup_switch_prob, "must be in [0, 1]")
    _check(0 <= d.label_smoothing < 1, "data.label_smoothing", d.label_smoothing, "must be in [0, 1)")

    _check(m.encoder in ENCODERS, "model.encoder", m.encoder, f"unknown encoder; choose one of: {', '.join(ENCODERS.names())}")
    _check(m.patch_size >= 0, "model.patch_size", m.patch_size, "must be >= 0 (0 = encoder default)")
    if m.patch_size:
        _check(d.image_size % m.patch_size == 0, "model.patch_size", m.patch_size, f"must divide data.image_size={d.image_size}")
    for key in ("proj_hidden_dim", "proj_dim"):
        _check(getattr(m, key) >= 1, f"model.{key}", getattr(m, key), "must be >= 1")
    _check(m.input_scale > 0, "model.input_scale", m.input_scale, "must be > 0")
    _check(m.head_hidden_dim >= 0, "model.head_hidden_dim", m.head_hidden_dim, "must be >= 0 (0 = linear head)")

    _check(o.name in ("adamw", "adam", "sgd", "lamb", "lars"), "optim.name", o.name, "choose one of: adamw, adam, sgd, lamb, lars")
    _check(o.lr > 0, "optim.lr", o.lr, "must be > 0")
    _check(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "must be >= 0")
    _check(0 < o.layer_decay <= 1, "optim.layer_decay", o.layer_decay, "must be in (0, 1] (1 = off)")
    _check(o.warmup_steps >= 0, "optim.warmup_steps", o.warmup_steps, "must be >= 0")
    _check(0 <= o.min_lr <= o.lr, "optim.min_lr", o.min_lr, f"must be in [0, optim.lr={o.lr}]")
    _check(o.grad_clip >= 0, "optim.grad_clip", o.grad_clip, "must be >= 0 (0 = off)")
    _check(o.schedule in ("cosine", "step"), "optim.schedule", o.schedule, "choose one of: cosine, step")
    _check(0 < o.gamma <= 1, "optim.gamma", o.gamma, "must be in (0, 1]")
    for key in ("milestones", "milestone_epochs"):
        values = list(getattr(o, key))
        _check(all(v > 0 for v in values) and values == sorted(values), f"optim.{key}", getattr(o, key), "must be positive and increasing")

    _check(t.steps >= 1, "train.steps", t.steps, "must be >= 1")
    _check(t.epochs >= 0, "train.epochs", t.epochs, "must be >= 0 (0 = use train.steps)")
    _check(t.checkpoint_epochs >= 0, "train.checkpoint_epochs", t.checkpoint_epochs, "must be >= 0")
    for key in ("warmup_epochs", "schedule_epochs", "schedule_steps"):
        _check(getattr(o, key) >= 0, f"optim.{key}", getattr(o, key), "must be >= 0")
    _check(t.eval_votes >= 1, "train.eval_votes", t.eval_votes, "must be >= 1")
    allowed = ["val_acc_clean"] + [f"val_acc_sigma_{s:g}" for s in t.eval_sigmas]
    allowed += [f"val_smoothed_acc_sigma_{s:g}" for s in t.eval_sigmas] if t.eval_votes > 1 else []
    _check(not t.select_metric or (t.select_metric in allowed and cfg.method.stage == "classifier"), "train.select_metric",
           t.select_metric, f"choose one of: {', '.join(allowed)} (classifier stages only), or empty for the last checkpoint")
    _check(t.workers >= 0, "train.workers", t.workers, "must be >= 0 (0 = run in the driver)")
    _check(t.precision in PRECISIONS, "train.precision", t.precision, f"choose one of: {', '.join(PRECISIONS)}")
    _check(t.checkpoint_every >= 1, "train.checkpoint_every", t.checkpoint_every, "must be >= 1")
    _check(t.keep_checkpoints >= 1, "train.keep_checkpoints", t.keep_checkpoints, "must be >= 1")
    _check(t.max_failures >= -1, "train.max_failures", t.max_failures, "must be >= 0, or -1 for unlimited")
    _check(t.log_every >= 1, "train.log_every", t.log_every, "must be >= 1")
    for s in t.eval_sigmas:
        _check(s > 0, "train.eval_sigmas", s, "every sigma must be > 0 (pixel units, data in [0, 1])")
    _check(all(c.isalnum() or c in "-_." for c in cfg.job_name), "train.name", cfg.job_name, "use letters, digits, '-', '_' or '.'")

    _check(bool(tr.experiment), "tracking.experiment", tr.experiment, "must not be empty")
    _check(all(c.isalnum() or c in "-_" for c in tr.alias), "tracking.alias", tr.alias, "MLflow aliases use letters, digits, '_' and '-' only (e.g. sigma-0_50)")
    _check(not tr.alias or bool(tr.register_as), "tracking.alias", tr.alias, "needs tracking.register_as")
    cfg.method.validate(cfg)
    return cfg


def resolve_epochs(cfg: ExperimentConfig, train_images: int) -> ExperimentConfig:
    """Turn ``train.epochs`` / ``train.checkpoint_epochs`` / ``optim.warmup_epochs`` /
    ``optim.schedule_epochs`` into steps.

    One epoch is ``floor(train_images / data.batch_size)`` optimizer steps (the last partial
    batch is dropped, as the seeds' loaders do).
    """
    per_epoch = max(1, train_images // cfg.data.batch_size)
    t, o = cfg.train, cfg.optim
    if t.epochs > 0:  # per-epoch sizes from the method: a coreset method (RCS) has shorter epochs after its warm-up
        sizes = [max(1, cfg.method.epoch_samples(e, train_images) // cfg.data.batch_size) for e in range(math.ceil(t.epochs))]
        whole = int(t.epochs)
        steps = sum(sizes[:whole]) + (math.ceil((t.epochs - whole) * sizes[whole]) if whole < len(sizes) else 0)
        t = replace(t, steps=max(1, steps))
    if t.checkpoint_epochs > 0:
        t = replace(t, checkpoint_every=max(1, int(round(t.checkpoint_epochs * per_epoch))))
    if o.warmup_epochs > 0:
        o = replace(o, warmup_steps=int(round(o.warmup_epochs * per_epoch)))
    if o.schedule_epochs > 0:
        o = replace(o, schedule_steps=int(round(o.schedule_epochs * per_epoch)))
    if o.milestone_epochs:
        o = replace(o, milestones=tuple(int(round(e * per_epoch)) for e in o.milestone_epochs))
    return replace(cfg, train=t, optim=o)


def to_flat_dict(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten to ``{"optim.lr": 0.001, ...}`` (MLflow params, Ray Train config)."""
    out: dict[str, Any] = {}
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        key = f"{prefix}{f.name}"
        if is_dataclass(value):
            out.update(to_flat_dict(value, key + "."))
        else:
            out[key] = value
    return out


def to_dict(cfg: ExperimentConfig) -> dict[str, dict[str, Any]]:
    """Nested plain dict; :func:`from_dict` of it gives the same config back."""
    return {f.name: dataclasses.asdict(getattr(cfg, f.name)) for f in fields(cfg)}


# ----------------------------------------------------------------------------- any dataclass


def update_dataclass(obj: Any, tree: dict[str, Any], prefix: str = "") -> Any:
    """``obj`` with ``tree`` applied: nested mappings go into nested dataclass fields; unknown keys
    and badly typed values raise a one-line :class:`ConfigError` naming the dotted key."""
    hints = _hints(type(obj))
    current = {f.name: getattr(obj, f.name) for f in fields(obj)}
    changes = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if key not in current:
            where = prefix.rstrip(".") or "the config"
            raise ConfigError(dotted, value, f"unknown key; {where} has: {', '.join(sorted(current))}")
        if is_dataclass(current[key]):
            if not isinstance(value, dict):
                raise ConfigError(dotted, value, "is a section; set its keys, e.g. " + f"{dotted}.<key>=...")
            changes[key] = update_dataclass(current[key], value, dotted + ".")
        else:
            changes[key] = _coerce(dotted, value, hints[key])
    return replace(obj, **changes)


def parse_dotted(items: list[str]) -> dict[str, Any]:
    """``["a.b=1", "c=2"]`` -> ``{"a": {"b": "1"}, "c": "2"}`` (any depth)."""
    tree: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise ConfigError(item, item, "overrides look like key=value or section.key=value")
        node = tree
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(key, value, "mixes a section and a value")
        node[parts[-1]] = value
    return tree
