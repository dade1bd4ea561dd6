"""The experiment config: typed, frozen sections loaded from a Python or YAML recipe and overridden
with dotted keys (``--set section.key=value``, repeatable).

Imports flow one way: the sections (:mod:`rayrcm.sections`) and the override parser
(:mod:`rayrcm.overrides`) know no registry; datasets, encoders, objectives, evaluations and export
kinds import them; this module sits above all of those registries and does the checks that need
them. ``method`` is the config dataclass of the chosen objective, so
``--set method.name=gaussian --set method.sigma=0.5`` works. Every value is checked by
:func:`validate` before any Ray work starts; errors are :class:`~rayrcm.errors.ConfigError` with a
one-line message. ``train.plugins`` (modules or ``.py`` files) are imported before the rest of a
recipe is read, so a method, evaluation or export kind registered there can be named in it.
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
import weakref
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from rayrcm.data.native import native_size, resolve_image_size
from rayrcm.errors import ConfigError
from rayrcm.lengths import SHADOWED, check_recipe, check_shadowed, rescale_schedule, set_keys
from rayrcm.overrides import (
    check_finite,
    coerce,
    parse_dotted,
    to_dict,
    to_flat_dict,
    update_dataclass,
)
from rayrcm.plugins import load_plugins
from rayrcm.sections import (
    AUGMENTATIONS,
    PRECISIONS,
    STORAGE_ENV,
    DataConfig,
    ModelConfig,
    OptimConfig,
    TrackingConfig,
    TrainConfig,
    check,
    check_data,
    check_job_name,
    check_model,
    check_optim,
    check_tracking,
    check_train,
    default_storage,
    default_tracking_uri,
)

DEFAULT_METHOD = "rcm"


def method_config_class(name: str) -> type:
    """The config dataclass of method ``name``. The registries (objectives, datasets, encoders,
    evaluations, exports) load when a config is built or checked, not when this module is imported:
    a recipe's ``--help`` answers without torch."""
    from rayrcm.objectives import method_config_class as lookup

    return lookup(name)


@dataclass(frozen=True)
class ExperimentConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: Any = None  # the objective's own config dataclass (see rayrcm.objectives); default: RCM
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        if self.method is None:
            object.__setattr__(self, "method", method_config_class(DEFAULT_METHOD)())

    @property
    def job_name(self) -> str:
        return self.train.name or f"{self.tracking.experiment}-{self.method.name}"


# ----------------------------------------------------------------------------- building


def from_dict(tree: dict[str, Any], base: ExperimentConfig | None = None) -> ExperimentConfig:
    """Build a config from a nested dict (a YAML recipe, a parsed override list), on top of ``base``
    or the defaults. ``train.plugins`` are imported first; ``method.name`` picks the method's config
    class before its other keys are set."""
    tree = dict(tree)
    train = tree.get("train")
    if isinstance(train, dict) and "plugins" in train:
        load_plugins(coerce("train.plugins", train["plugins"], tuple[str, ...]))
    cfg = base or ExperimentConfig()
    method = tree.pop("method", None)
    if method is not None:
        if not isinstance(method, dict):
            raise ConfigError("method", method, "is a section; set its keys, e.g. method.<key>=...")
        current = cfg.method
        if "name" in method and method["name"] != current.name:
            try:
                current = method_config_class(method["name"])()
            except KeyError as err:
                raise ConfigError("method.name", method["name"], err.args[0]) from None
        cfg = replace(cfg, method=update_dataclass(current, method, "method."))
    sections = {f.name for f in fields(ExperimentConfig)}
    for name in tree:
        if name not in sections:
            raise ConfigError(name, tree[name], f"unknown section; sections are: {', '.join(sorted(sections))}")
    new, notes = _follow_dataset(update_dataclass(cfg, tree), cfg, tree)
    return _defer(new, notes)


# one-line notices about a config (what an override rescaled), printed on stderr by validate() once
# the config is known to be good, so bad input stays one line
_NOTICES: weakref.WeakKeyDictionary[ExperimentConfig, list[str]] = weakref.WeakKeyDictionary()


def _defer(cfg: ExperimentConfig, notes: list[str]) -> ExperimentConfig:
    if notes:
        try:
            pending = _NOTICES.setdefault(cfg, [])
            pending.extend(n for n in notes if n not in pending)
        except TypeError:  # an unhashable method config: say it now
            for note in notes:
                print(note, file=sys.stderr, flush=True)
    return cfg


def _follow_dataset(new: ExperimentConfig, old: ExperimentConfig,
                    tree: dict[str, Any]) -> tuple[ExperimentConfig, list[str]]:
    """``data.image_size`` 0 (unset) becomes the dataset's native size; a ``data.name`` change that
    does not set ``data.image_size`` moves a size that was the old dataset's native one to the new
    dataset's (with a notice), so digits' 16 never carries over to CIFAR-10 unnoticed."""
    d, notes = new.data, []
    data = tree.get("data")
    data_tree: dict[str, Any] = data if isinstance(data, dict) else {}
    if d.image_size and d.name != old.data.name and "image_size" not in data_tree:
        before, after = native_size(old.data.name), native_size(d.name)
        if after and d.image_size == before and after != before:
            notes.append(f"[rayrcm] data.name {old.data.name} -> {d.name}: data.image_size {d.image_size} -> {after} "
                         "(the dataset's native size; set data.image_size to choose another)")
            d = replace(d, image_size=after)
    d = resolve_image_size(d)
    return (new if d is new.data else replace(new, data=d)), notes


def apply_overrides(cfg: ExperimentConfig, items: list[str]) -> ExperimentConfig:
    """``cfg`` with ``["optim.lr=2e-4", "method.name=gaussian", ...]`` applied: the user's keys.

    A key in steps the overrides set while its epoch twin (``train.epochs``, ...) is in effect is
    refused (:func:`check_shadowed`); a changed run length rescales the schedule
    (:func:`rescale_schedule`)."""
    tree = parse_dotted(items, min_depth=2)
    new = from_dict(tree, cfg)
    keys = set_keys(tree)
    check_shadowed(new, keys)
    notes = _NOTICES.pop(new, []) if _hashable(new) else []
    out, rescaled = rescale_schedule(new, cfg, keys)
    return _defer(out, notes + rescaled)


def _hashable(cfg: ExperimentConfig) -> bool:
    try:
        hash(cfg)
    except TypeError:
        return False
    return True


def load_recipe(path: str | os.PathLike[str]) -> ExperimentConfig:
    """Load ``.yaml``/``.yml`` (nested mapping) or ``.py`` (a ``config()`` function or ``CONFIG``)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError("recipe", str(path), "no such file")
    if p.suffix in (".yaml", ".yml"):
        import yaml

        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as err:  # one line with the place, not PyYAML's multi-line report
            mark = getattr(err, "problem_mark", None)
            where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ConfigError("recipe", str(path), f"is not valid YAML ({where}{problem})") from None
        if not isinstance(tree, dict):
            raise ConfigError("recipe", str(path), f"must be a mapping of sections (data, model, method, ...), not a {type(tree).__name__}")
        cfg = from_dict(tree)
        check_recipe(tree, cfg, ExperimentConfig(), str(path))
        return cfg
    if p.suffix == ".py":
        import sys

        spec = importlib.util.spec_from_file_location(f"rayrcm_recipe_{p.stem}", p)
        assert spec and spec.loader
        module = importlib.util.module_from_spec(spec)
        folder = str(p.resolve().parent)  # its helper modules beside it (experiments/_rcm_seed.py) import as when run
        if folder not in sys.path:
            sys.path.insert(0, folder)
        try:
            spec.loader.exec_module(module)
            value = module.config() if hasattr(module, "config") else getattr(module, "CONFIG", None)
        except ConfigError:
            raise
        except Exception as err:  # noqa: BLE001 - the user's file: one line naming it, not a traceback
            first = (str(err).strip().splitlines() or [""])[0][:200]
            raise ConfigError("recipe", str(path), f"failed to load: {type(err).__name__}: {first}") from None
        if isinstance(value, dict):
            cfg = from_dict(value)
            check_recipe(value, cfg, ExperimentConfig(), str(path))
            return cfg
        if isinstance(value, ExperimentConfig):
            return value
        raise ConfigError("recipe", str(path), "defines no config() or CONFIG: a recipe of several stages runs as "
                          f"`python {path} STAGE` (`python {path} --help` lists them)")
    raise ConfigError("recipe", str(path), "recipes are .py, .yaml or .yml files")


# ----------------------------------------------------------------------------- validation


def _check_evals(cfg: ExperimentConfig) -> None:
    from rayrcm.eval import EVALUATIONS, build_evaluations

    t = cfg.train
    for key in ("evals", "test_evals"):
        for name in getattr(t, key):
            check(name in EVALUATIONS, f"train.{key}", name, f"unknown evaluation; choose from: {', '.join(EVALUATIONS.names())}")
    classifier = cfg.method.stage == "classifier"
    for name in t.encoder_evals:
        check(name in EVALUATIONS, "train.encoder_evals", name, f"unknown evaluation; choose from: {', '.join(EVALUATIONS.names())}")
        if not build_evaluations([name], cfg)[0].on_features:
            features = [n for n in EVALUATIONS.names() if getattr(getattr(EVALUATIONS.get(n), "__self__", None), "on_features", 0)]
            raise ConfigError("train.encoder_evals", name, f"does not work on an encoder's features; choose from: {', '.join(features)}")
    allowed = [m for ev in build_evaluations(t.evals, cfg) for m in ev.metric_names("val")]
    check(not t.select_metric or (t.select_metric in allowed and classifier), "train.select_metric", t.select_metric,
          f"choose one of: {', '.join(allowed)} (validation metrics of train.evals={','.join(t.evals)}; classifier stages "
          "only), or empty for the last checkpoint")


def validate(cfg: ExperimentConfig, *, check_paths: bool = True) -> ExperimentConfig:
    """Check every value; raise a one-line :class:`ConfigError` on the first bad one. Returns the
    config with ``data.image_size=0`` resolved to the dataset's native size (always concrete), and
    prints on stderr the one-line notices of :func:`apply_overrides` about it (what was rescaled).

    Every float of every section (tuples of floats included) must be finite: a Python recipe's
    values do not pass through the override parser, so they are walked here."""
    from rayrcm.data.datasets import DATASETS
    from rayrcm.models.encoders import ENCODERS
    from rayrcm.models.export import EXPORTS

    given = cfg
    check_finite(cfg)
    load_plugins(cfg.train.plugins)
    d, m = cfg.data, cfg.model
    check(d.name in DATASETS, "data.name", d.name, f"unknown dataset; choose one of: {', '.join(DATASETS.names())}")
    if check_paths:
        DATASETS.get(d.name).check_path(d.path)
    d = resolve_image_size(d)  # 0: the dataset's native size, before any check that uses it
    check(d.image_size != 0, "data.image_size", d.image_size,
          f"dataset {d.name} declares no native size (rayrcm.data.register_native_size); set data.image_size")
    cfg = replace(cfg, data=d) if d is not cfg.data else cfg
    check_data(d)
    check(m.encoder in ENCODERS, "model.encoder", m.encoder, f"unknown encoder; choose one of: {', '.join(ENCODERS.names())}")
    check_model(m, d.image_size)
    if m.lora_rank:  # LoRA needs a ViT: asked of the encoder itself, built without weights (meta device)
        import torch

        from rayrcm.models.encoders import ViTEncoder

        with torch.device("meta"):
            encoder = ENCODERS.get(m.encoder)(m, m.input_resize or d.image_size)
        check(isinstance(encoder, ViTEncoder), "model.lora_rank", m.lora_rank,
              f"only ViT encoders take LoRA ({m.encoder!r} is not one)")
    check_optim(cfg.optim)
    check_train(cfg.train)
    check(cfg.method.export in EXPORTS, "method.name", cfg.method.name,
          f"exports an unregistered model kind {cfg.method.export!r}; registered: {', '.join(EXPORTS.names())}")
    _check_evals(cfg)
    check_job_name("train.name" if cfg.train.name else "tracking.experiment", cfg.job_name)
    check_tracking(cfg.tracking)
    cfg.method.validate(cfg)
    for note in _NOTICES.pop(given, []) if _hashable(given) else []:
        print(note, file=sys.stderr, flush=True)
    return cfg


def resolve_epochs(cfg: ExperimentConfig, train_images: int) -> ExperimentConfig:
    """Turn ``train.epochs`` / ``train.checkpoint_epochs`` / ``optim.warmup_epochs`` /
    ``optim.schedule_epochs`` into steps.

    One epoch is ``floor(train_images / (data.batch_size * train.accum_iter))`` optimizer steps (the
    last partial batch is dropped, as the seeds' loaders do). A key in epochs, when set, decides: its twin in
    steps is overwritten here, so setting that twin on the command line is refused
    (:func:`check_shadowed`), and so is a recipe that sets both to non-default values.

    Lengths under overrides (:func:`rescale_schedule`, applied by :func:`apply_overrides`): when the
    user changes the run length (``train.epochs``, or ``train.steps`` in a recipe counted in steps)
    and sets no schedule length, a schedule length the recipe wrote (``optim.schedule_epochs`` /
    ``schedule_steps`` > 0) is scaled by new/old length, and the warm-up and the ``step``
    schedule's milestones by the same factor; a schedule that follows the run (length 0) keeps the
    recipe's warm-up unless it would cover the whole new run, which scales it too. One line says
    what was rescaled, e.g. ``[rayrcm] train.epochs 30 -> 2: optim.schedule_epochs 30 -> 2,
    optim.warmup_epochs 5 -> 0.333``. Without overrides, recipes resolve exactly as written.
    """
    update = cfg.data.batch_size * cfg.train.accum_iter  # images per optimizer step
    per_epoch = max(1, train_images // update)
    t, o = cfg.train, cfg.optim
    sizes: list[int] = []
    if t.epochs > 0:  # per-epoch sizes from the method: a coreset method (RCS) has shorter epochs after its warm-up
        sizes = [max(1, cfg.method.epoch_samples(e, train_images) // update) for e in range(math.ceil(t.epochs))]
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
    if cfg.train.epochs > 0 and not o.schedule_steps and any(s != per_epoch for s in sizes):
        # shorter (coreset) epochs: the schedule runs over whole-set epochs, indexed by the epoch
        # position (rayrcm.train.optim.EpochIndexedSchedule), as the RCS authors' per-epoch cosine
        o = replace(o, schedule_steps=int(round(cfg.train.epochs * per_epoch)))
    return replace(cfg, train=t, optim=o)


def needs_epochs(cfg: ExperimentConfig) -> bool:
    """Whether :func:`resolve_epochs` has anything to do (it needs the training set's size)."""
    t, o = cfg.train, cfg.optim
    return t.epochs > 0 or t.checkpoint_epochs > 0 or o.warmup_epochs > 0 or o.schedule_epochs > 0 or bool(o.milestone_epochs)


__all__ = [
    "AUGMENTATIONS", "PRECISIONS", "SHADOWED", "STORAGE_ENV", "DataConfig", "ExperimentConfig", "ModelConfig",
    "OptimConfig", "TrackingConfig", "TrainConfig", "apply_overrides", "check_shadowed", "default_storage",
    "default_tracking_uri", "from_dict", "load_recipe", "needs_epochs", "parse_dotted", "rescale_schedule",
    "resolve_epochs", "to_dict", "to_flat_dict", "update_dataclass", "validate",
]
