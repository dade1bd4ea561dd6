"""Run lengths in steps or in epochs: a key in steps that its epoch twin shadows is refused in one
line (:func:`check_shadowed`, :func:`check_recipe`), and a changed run length rescales the
schedule and warm-up (:func:`rescale_schedule`). Pure functions of configs; :mod:`rayrcm.config`
applies them."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from rayrcm.errors import ConfigError

# a rayrcm.config.ExperimentConfig; not imported, even for type checking: config imports this module
ExperimentConfig = Any


# (key in steps, the key in epochs that sets it when > 0 / not empty, what it sets): resolve_epochs
SHADOWED = (
    ("train.steps", "train.epochs", "the length"),
    ("train.checkpoint_every", "train.checkpoint_epochs", "the checkpoint interval"),
    ("optim.warmup_steps", "optim.warmup_epochs", "the warm-up"),
    ("optim.schedule_steps", "optim.schedule_epochs", "the schedule length"),
    ("optim.milestones", "optim.milestone_epochs", "the milestones"),
)


_SCHEDULE_KEYS = ("optim.schedule_epochs", "optim.schedule_steps", "optim.warmup_epochs", "optim.warmup_steps",
                  "optim.milestone_epochs", "optim.milestones")


def _get(cfg: ExperimentConfig, dotted: str) -> Any:
    section, key = dotted.split(".")
    return getattr(getattr(cfg, section), key)


def _in_effect(value: Any) -> bool:
    return bool(value) if isinstance(value, tuple) else value > 0


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(_show(v) for v in value)
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _off(value: Any) -> str:
    return "to empty" if isinstance(value, tuple) else "=0"


def set_keys(tree: dict[str, Any], prefix: str = "") -> set[str]:
    """The dotted keys a nested mapping sets: ``{"train": {"steps": 1}}`` -> ``{"train.steps"}``."""
    out: set[str] = set()
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        out |= set_keys(value, dotted + ".") if isinstance(value, dict) else {dotted}
    return out


def check_shadowed(cfg: ExperimentConfig, keys: set[str]) -> None:
    """A key in steps the user set (``keys``) that its epoch twin shadows in ``cfg`` would do nothing:
    one-line :class:`ConfigError` naming both keys and the fix."""
    for shadowed, by, what in SHADOWED:
        if shadowed in keys and _in_effect(_get(cfg, by)):
            value = _get(cfg, by)
            raise ConfigError(shadowed, _get(cfg, shadowed), f"{by}={_show(value)} sets {what}; set {by}{_off(value)} "
                              f"to use {shadowed}, or change {by}")


def _scaled(value: Any, factor: float, in_steps: bool) -> Any:
    """``value * factor``: whole steps (at least 1) for a key in steps, a fraction for one in epochs."""
    if isinstance(value, tuple):
        return tuple(_scaled(v, factor, in_steps) for v in value)
    if in_steps:
        return max(1, int(round(value * factor)))
    return round(float(value) * factor, 6)


def _length(cfg: ExperimentConfig) -> tuple[str, float]:
    """The key that sets the run length and its value (epochs when > 0, else steps)."""
    t = cfg.train
    return ("train.epochs", t.epochs) if t.epochs > 0 else ("train.steps", float(t.steps))


def _warmup(cfg: ExperimentConfig) -> str | None:
    o = cfg.optim
    return "optim.warmup_epochs" if o.warmup_epochs > 0 else "optim.warmup_steps" if o.warmup_steps > 0 else None


def rescale_schedule(cfg: ExperimentConfig, base: ExperimentConfig, keys: set[str]) -> tuple[ExperimentConfig, list[str]]:
    """``cfg`` (``base`` with the user's ``keys`` set) with the schedule following a changed run length.

    When the user changes ``train.epochs`` (or ``train.steps``, in the same unit as ``base``) by a
    factor ``f`` and sets no schedule length (``optim.schedule_epochs`` / ``schedule_steps``):

    * a schedule length the recipe wrote for its own length (``> 0``) is scaled by ``f``, and so are
      the ``step`` schedule's milestones and the warm-up (each unless the user set it);
    * a schedule that follows the run (length 0) keeps the recipe's warm-up (the authors' fixed
      warm-up of a shorter run), unless that warm-up would cover the whole new run: then it is
      scaled by ``f`` too.

    Returns the config and one line saying what was rescaled (printed by
    :func:`rayrcm.config.validate`, so bad input stays one line). Switching between ``train.epochs`` and
    ``train.steps`` (a factor needs the training set's size) keeps the optimizer keys as written.
    """
    if not keys & {"train.epochs", "train.steps"} or keys & {"optim.schedule_epochs", "optim.schedule_steps"}:
        return cfg, []
    (unit, old), (new_unit, new) = _length(base), _length(cfg)
    if unit != new_unit:  # no factor without the training set's size: say what stays as the recipe wrote it
        kept = [f"{k}={_show(_get(cfg, k))}" for k in _SCHEDULE_KEYS if k not in keys and _in_effect(_get(cfg, k))]
        return cfg, ([f"[rayrcm] the length moved from {unit} to {new_unit}: {', '.join(kept)} kept as the recipe "
                      "wrote them (set them for the new length)"] if kept else [])
    if old == new or old <= 0:
        return cfg, []
    factor = new / old
    o = cfg.optim
    changes: dict[str, Any] = {}
    schedule = ("optim.schedule_epochs" if o.schedule_epochs > 0
                else "optim.schedule_steps" if o.schedule_steps > 0 else None)
    if schedule:
        changes[schedule] = _scaled(_get(cfg, schedule), factor, not schedule.endswith("epochs"))
    milestones = "optim.milestone_epochs" if o.milestone_epochs else "optim.milestones" if o.milestones else None
    if o.schedule == "step" and milestones and not keys & {"optim.milestones", "optim.milestone_epochs"}:
        changes[milestones] = _scaled(_get(cfg, milestones), factor, not milestones.endswith("epochs"))
    warmup = _warmup(cfg)
    if warmup and not keys & {"optim.warmup_steps", "optim.warmup_epochs"}:
        covers = warmup.split("_")[-1] == unit.split(".")[-1] and _get(cfg, warmup) >= new
        if changes or covers:
            changes[warmup] = _scaled(_get(cfg, warmup), factor, not warmup.endswith("epochs"))
            if isinstance(changes[warmup], int) and covers:
                changes[warmup] = min(changes[warmup], int(new) - 1)
    if not changes:
        return cfg, []
    say = ", ".join(f"{k} {_show(_get(cfg, k))} -> {_show(v)}" for k, v in changes.items())
    note = (f"[rayrcm] {unit} {_show(old if unit == 'train.epochs' else int(old))} -> "
            f"{_show(new if unit == 'train.epochs' else int(new))}: {say}")
    optim = {k.split(".")[1]: v for k, v in changes.items()}
    return replace(cfg, optim=replace(o, **optim)), [note]


def check_recipe(tree: dict[str, Any], cfg: ExperimentConfig, defaults: ExperimentConfig, path: str) -> None:
    """A recipe that sets a key in steps to a non-default value and its epoch twin too: one line."""
    keys = set_keys(tree)
    for shadowed, by, what in SHADOWED:
        value = _get(cfg, by)
        if shadowed in keys and by in keys and _in_effect(value) and _get(cfg, shadowed) != _get(defaults, shadowed):
            raise ConfigError(shadowed, _get(cfg, shadowed), f"recipe {path} also sets {by}={_show(value)}, which sets "
                              f"{what}; remove {shadowed} from the recipe, or set {by}{_off(value)}")
