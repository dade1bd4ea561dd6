"""A sweep's settings and search space, checked before Ray starts.

Search spaces are ``{dotted key: spec}`` with spec ``grid:a,b,c`` (every value, crossed with the
other grids), ``choice:a,b`` (random), ``uniform:lo,hi``, ``loguniform:lo,hi``,
``randint:lo,hi`` (hi exclusive), or a plain value. Every value and range end is applied to the
trial base config and validated, so a bad space fails with one line.

The metric defaults to ``val_smoothed_acc_sigma_<s>`` at the base config's ``method.sigma``: the
trials run the ``smoothed`` validation evaluation (``train.evals``) with ``votes`` noise draws.

The best trial's model is registered under ``register_as`` with the sweep's own alias by default
(:func:`sweep_alias`); an alias that points at another job's model moves only with ``move_alias``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from typing import Any

import yaml

from rayrcm.config import ExperimentConfig, apply_overrides, update_dataclass, validate
from rayrcm.errors import ConfigError

SCHEDULERS = ("asha", "fifo")
KINDS = ("grid", "choice", "uniform", "loguniform", "randint")
SMOOTHED_EVAL = "smoothed"  # the evaluation that produces val_smoothed_acc_sigma_<s>
CERTIFIED_EVAL = "certified"  # the evaluation that produces val_certified_acc_sigma_<s>_r<r> (a sound lower bound)
CERTIFIED_METRIC = "_certified_acc_"


@dataclass(frozen=True)
class SweepConfig:
    space: dict[str, Any] = field(default_factory=dict)  # dotted key -> spec (see the module docstring)
    metric: str = ""  # default: val_smoothed_acc_sigma_<method.sigma of the base config>
    mode: str = "max"
    votes: int = 8  # noise draws per validation image for val_smoothed_acc_*
    num_samples: int = 1  # trials per grid point (random spaces: the number of trials)
    scheduler: str = "asha"
    grace_period: int = 1  # reports a trial makes before ASHA may stop it
    reduction_factor: int = 2
    report_epochs: int = 1  # report (and checkpoint) every this many epochs
    max_concurrent_trials: int = 0  # 0: as many as the cluster's CPUs/GPUs hold now
    max_failures: int = 1  # retries of a failed trial
    name: str = ""  # default: <base train.name>-sweep
    register_as: str = ""  # default: the base config's tracking.register_as
    # default: the sweep's own alias (its name) when the base config sets tracking.alias; never the
    # base config's alias, which another job (the recipe's fine-tuning, the quickstart) may hold
    alias: str = ""
    move_alias: bool = False  # allow moving an alias that points at a model another job registered


def _scalar(v: str) -> Any:
    for typ in (int, float):
        try:
            return typ(v)
        except ValueError:
            pass
    return yaml.safe_load(v)  # true/false, strings


def _values(raw: str) -> list[Any]:
    return [_scalar(v.strip()) for v in raw.split(",") if v.strip()]


def parse_spec(key: str, spec: Any) -> tuple[str, list[Any]]:
    """``(kind, values)``: the values of a grid/choice, or ``[lo, hi]`` of a range."""
    if not isinstance(spec, str) or ":" not in spec:
        return "const", [spec]
    kind, _, rest = spec.partition(":")
    if kind not in KINDS:
        return "const", [_scalar(spec)]
    vals = _values(rest)
    if not vals:
        raise ConfigError(f"space.{key}", spec, "is empty: give at least one value")
    if kind in ("uniform", "loguniform", "randint"):
        if len(vals) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
            raise ConfigError(f"space.{key}", spec, f"{kind} takes two numbers: {kind}:low,high")
        lo, hi = vals
        if not all(math.isfinite(v) for v in vals):
            raise ConfigError(f"space.{key}", spec, f"{kind} takes two finite numbers: {kind}:low,high")
        if not lo < hi:
            raise ConfigError(f"space.{key}", spec, "is an empty range: low must be < high")
        if kind == "loguniform" and lo <= 0:
            raise ConfigError(f"space.{key}", spec, "loguniform needs low > 0")
        if kind == "randint":
            vals = [int(lo), int(hi) - 1]
    return kind, vals


def check_space(base: ExperimentConfig, space: dict[str, Any]) -> dict[str, tuple[str, list[Any]]]:
    """Parse every spec and validate each value (or range end) applied to the base config."""
    if not space:
        raise ConfigError("space", "{}", "give at least one key to sweep, e.g. --space method.lbd=grid:5,10,20")
    parsed = {}
    for key, spec in space.items():
        kind, vals = parse_spec(key, spec)
        for v in vals:
            try:
                validate(apply_overrides(base, [f"{key}={v}"]), check_paths=False)
            except ConfigError as err:
                raise ConfigError(f"space.{key}", spec, f"value {v!r} fails: {err}") from None
        parsed[key] = (kind, vals)
    return parsed


def tune_space(parsed: dict[str, tuple[str, list[Any]]]) -> dict[str, Any]:
    from ray import tune

    make = {"grid": tune.grid_search, "choice": tune.choice, "uniform": lambda v: tune.uniform(*v),
            "loguniform": lambda v: tune.loguniform(*v), "randint": lambda v: tune.randint(v[0], v[1] + 1),
            "const": lambda v: v[0]}
    return {key: make[kind](vals) for key, (kind, vals) in parsed.items()}


def default_metric(base: ExperimentConfig) -> str:
    sigma = getattr(base.method, "sigma", None)
    if sigma is None:
        raise ConfigError("sweep.metric", "", f"method {base.method.name} has no sigma: name the metric to optimize")
    return f"val_smoothed_acc_sigma_{sigma:g}"


def sweep_alias(name: str) -> str:
    """The sweep's own registry alias: its name in the letters MLflow aliases allow."""
    alias = re.sub(r"[^A-Za-z0-9_-]", "_", name)
    return f"sweep-{alias}" if re.fullmatch(r"[vV]\d+|latest", alias) else alias


def _short_keys(keys: list[str]) -> dict[str, str]:
    """Each key's last part (``method.lbd`` -> ``lbd``), or the whole key where two last parts clash."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: s if last.count(s) == 1 else k for k, s in zip(keys, last)}


def _show(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def trial_values(config: dict[str, Any], keys: list[str]) -> list[str]:
    """A trial's ``key=value`` of each of ``keys`` that it has, short keys (``lbd=5``)."""
    short = _short_keys(keys)
    return [f"{short[k]}={_show(config[k])}" for k in keys if k in config]


def trial_label(config: dict[str, Any], keys: list[str]) -> str:
    """A trial's values of ``keys``, short: ``lbd=5 lr=0.002`` (its name in MLflow, Tune and TensorBoard)."""
    return " ".join(trial_values(config, keys))


def _check_settings(sw: SweepConfig) -> None:
    if sw.mode not in ("max", "min"):
        raise ConfigError("sweep.mode", sw.mode, "choose max or min")
    if sw.scheduler not in SCHEDULERS:
        raise ConfigError("sweep.scheduler", sw.scheduler, f"choose one of: {', '.join(SCHEDULERS)}")
    for key in ("votes", "num_samples", "grace_period", "report_epochs"):
        if getattr(sw, key) < 1:
            raise ConfigError(f"sweep.{key}", getattr(sw, key), "must be >= 1")
    if sw.reduction_factor < 2:
        raise ConfigError("sweep.reduction_factor", sw.reduction_factor, "must be >= 2")
    if sw.max_concurrent_trials < 0:
        raise ConfigError("sweep.max_concurrent_trials", sw.max_concurrent_trials, "must be >= 0 (0 = from the cluster)")
    if sw.max_failures < -1:
        raise ConfigError("sweep.max_failures", sw.max_failures, "must be >= -1 (-1 = retry forever)")


def trial_base(base: ExperimentConfig, sw: SweepConfig) -> ExperimentConfig:
    """The base config every trial starts from: the ``smoothed`` validation evaluation (besides the
    user's) with ``votes`` draws (and the ``certified`` one when the metric is a certified accuracy), a report (and checkpoint) every ``report_epochs`` epochs (a
    steps-based config reports every ``checkpoint_every``), selection on the sweep metric."""
    t = base.train
    evals = t.evals if SMOOTHED_EVAL in t.evals else (*t.evals, SMOOTHED_EVAL)
    if CERTIFIED_METRIC in sw.metric and CERTIFIED_EVAL not in evals:  # a certified metric: its evaluation joins
        evals = (*evals, CERTIFIED_EVAL)
    base = update_dataclass(base, {"train": {"evals": evals, "eval_votes": sw.votes,
                                             **({"checkpoint_epochs": sw.report_epochs} if t.epochs else {})}})
    try:
        return validate(update_dataclass(base, {"train": {"select_metric": sw.metric}}), check_paths=False)
    except ConfigError:
        raise ConfigError("sweep.metric", sw.metric, "must be a validation metric of the trials, e.g. "
                          f"val_smoothed_acc_sigma_<s> or val_certified_acc_sigma_<s>_r<r> with s in "
                          f"train.eval_sigmas={list(t.eval_sigmas)}, r in train.eval_radii={list(t.eval_radii)}") from None


def validate_sweep(base: ExperimentConfig, sw: SweepConfig) -> tuple[ExperimentConfig, SweepConfig, dict[str, Any]]:
    """The trial base config (:func:`trial_base`), the checked sweep with its defaults filled in,
    and the parsed space; one-line errors for anything wrong."""
    base = validate(base, check_paths=False)
    if base.method.stage != "classifier":
        raise ConfigError("method.name", base.method.name, "sweeps tune classifier stages (fine-tuning)")
    _check_settings(sw)
    name = sw.name or f"{base.job_name}-sweep"
    from rayrcm.sections import check_job_name

    check_job_name("sweep.name", name)  # its folder under train.storage_path: one path component
    register_as = sw.register_as or base.tracking.register_as
    alias = sw.alias or (sweep_alias(name) if base.tracking.alias and register_as else "")
    if alias and not all(c.isalnum() or c in "-_" for c in alias):
        raise ConfigError("sweep.alias", alias, "MLflow aliases use letters, digits, '_' and '-' only (e.g. sigma-0_50)")
    if alias and not register_as:
        raise ConfigError("sweep.alias", alias, "needs sweep.register_as (or tracking.register_as)")
    sw = replace(sw, metric=sw.metric or default_metric(base), name=name, register_as=register_as, alias=alias)
    base = trial_base(base, sw)
    return base, sw, check_space(base, sw.space)


def config_from_args(items: list[str], space: list[str], base: SweepConfig | None = None) -> SweepConfig:
    """``--sweep key=value`` items and ``--space key=spec`` items on top of ``base``."""
    from rayrcm.config import parse_dotted

    sw = base or SweepConfig()
    tree = parse_dotted(items)
    if "space" in tree:
        raise ConfigError("sweep.space", tree["space"], "give search spaces with --space key=spec")
    sw = update_dataclass(sw, tree, prefix="sweep.")
    extra = {}
    for item in space:
        key, sep, spec = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError("--space", item, "write key=spec, e.g. method.lbd=grid:5,10,20")
        extra[key.strip()] = spec.strip()
    return replace(sw, space={**sw.space, **extra} if extra else sw.space)
