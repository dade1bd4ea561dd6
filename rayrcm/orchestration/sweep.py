"""Hyperparameter sweeps: Ray Tune over any config keys, each trial a Ray Train run, ASHA early
stopping, one MLflow parent run per sweep and a child run per trial, the best model registered.

Shape (Ray 2.60, Train V2): a Tune *function* trainable per trial builds and fits a
``TorchTrainer`` (:func:`rayrcm.orchestration.trainer.fit`), so a trial can use several workers
or GPUs; Tune's ``TuneReportCallback`` forwards every ``ray.train.report`` of rank 0 to Tune.
Trials report at every checkpoint, i.e. every ``report_epochs`` epochs.

The metric. ASHA compares trials on ``val_smoothed_acc_sigma_<s>`` by default: on the held-out
validation split, the fraction of images whose majority vote over ``votes`` Gaussian noise draws
at the *certification* sigma ``s`` equals the label. That is a Monte Carlo estimate of the
smoothed classifier's accuracy, i.e. of certified accuracy at radius 0 (Cohen et al. 2019)
without the abstentions; one noise draw (``val_acc_sigma_<s>``) is the base classifier's noisy
accuracy and ranks consistency-regularized models worse than their smoothed accuracy does. The
certification sigma stays fixed while a sweep varies the training noise (``method.sigma``).

Search spaces are ``{dotted key: spec}`` with spec ``grid:a,b,c`` (every value, crossed with the
other grids), ``choice:a,b`` (random), ``uniform:lo,hi``, ``loguniform:lo,hi``,
``randint:lo,hi`` (hi exclusive), or a plain value. Every value and range end is applied to the
base config and validated before Ray starts, so a bad space fails with one line.

Resume: the sweep's Tune experiment lives in ``<train.storage_path>/<sweep name>``; running the
same command again restores it (``Tuner.restore``, errored trials retried). A trial's Train run is
named ``<sweep>-<trial id>``, so a restarted trial resumes from its own Train checkpoints, and a
trial whose run already finished reports its recorded result instead of training again:
``trials.jsonl`` in the sweep folder records every start and end.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from rayrcm.config import (
    ExperimentConfig,
    apply_overrides,
    to_flat_dict,
    update_dataclass,
    validate,
)
from rayrcm.errors import ConfigError
from rayrcm.orchestration import tracking

SCHEDULERS = ("asha", "fifo")
KINDS = ("grid", "choice", "uniform", "loguniform", "randint")
TRIALS_LOG = "trials.jsonl"
SWEEP_TAG = "rayrcm.sweep"


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
    alias: str = ""  # default: the base config's tracking.alias


# ----------------------------------------------------------------------------- search spaces


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


def validate_sweep(base: ExperimentConfig, sw: SweepConfig) -> tuple[ExperimentConfig, SweepConfig, dict[str, Any]]:
    """The trial base config (reports every ``report_epochs``, selects on the sweep metric) and the
    checked sweep; one-line errors for anything wrong."""
    base = validate(base, check_paths=False)
    if base.method.stage != "classifier":
        raise ConfigError("method.name", base.method.name, "sweeps tune classifier stages (fine-tuning)")
    if sw.mode not in ("max", "min"):
        raise ConfigError("sweep.mode", sw.mode, "choose max or min")
    if sw.scheduler not in SCHEDULERS:
        raise ConfigError("sweep.scheduler", sw.scheduler, f"choose one of: {', '.join(SCHEDULERS)}")
    for key in ("votes", "num_samples", "grace_period", "report_epochs"):
        if getattr(sw, key) < 1:
            raise ConfigError(f"sweep.{key}", getattr(sw, key), "must be >= 1")
    if sw.reduction_factor < 2:
        raise ConfigError("sweep.reduction_factor", sw.reduction_factor, "must be >= 2")
    if sw.max_concurrent_trials < 0 or sw.max_failures < -1:
        raise ConfigError("sweep.max_concurrent_trials", sw.max_concurrent_trials, "must be >= 0 (0 = from the cluster)")
    metric = sw.metric or default_metric(base)
    sw = replace(sw, metric=metric, name=sw.name or f"{base.job_name}-sweep",
                 register_as=sw.register_as or base.tracking.register_as, alias=sw.alias or base.tracking.alias)
    t = base.train
    # report (and checkpoint) every report_epochs epochs; a steps-based config reports every checkpoint_every
    base = update_dataclass(base, {"train": {"eval_votes": sw.votes,
                                             **({"checkpoint_epochs": sw.report_epochs} if t.epochs else {})}})
    try:
        base = validate(update_dataclass(base, {"train": {"select_metric": metric}}), check_paths=False)
    except ConfigError:
        raise ConfigError("sweep.metric", metric, "must be a validation metric of the trials, e.g. "
                          f"val_smoothed_acc_sigma_<s> with s in train.eval_sigmas={list(t.eval_sigmas)}") from None
    parsed = check_space(base, sw.space)
    return base, sw, parsed


def concurrency(base: ExperimentConfig, sw: SweepConfig) -> int:
    """``max_concurrent_trials``, or as many trials as the cluster's CPUs (GPUs) hold now."""
    if sw.max_concurrent_trials:
        return sw.max_concurrent_trials
    import ray

    res = ray.cluster_resources()
    per_trial = max(base.train.workers, 1)
    have = res.get("GPU", 0) if base.train.use_gpu else res.get("CPU", 1)
    return max(1, int(have // per_trial))


# ----------------------------------------------------------------------------- trials


def _log_event(folder: Path, event: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / TRIALS_LOG, "a") as f:
        f.write(json.dumps({**event, "time": time.time()}) + "\n")


def read_events(folder: str | Path) -> list[dict[str, Any]]:
    f = Path(folder) / TRIALS_LOG
    return [json.loads(line) for line in f.read_text().splitlines() if line.strip()] if f.exists() else []


def _trial(params: dict[str, Any], *, base: dict[str, Any], sweep: dict[str, Any]) -> None:
    """One trial: the base config with this trial's values, fitted on Ray Train, reported to Tune."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from rayrcm.config import from_dict
    from rayrcm.orchestration.trainer import fit

    trial_id = tune.get_context().get_trial_id()
    folder = Path(sweep["folder"])
    job = f"{sweep['name']}-{trial_id}"
    done = [e for e in read_events(folder) if e["trial"] == trial_id and e["event"] == "end"]
    if done:  # finished before an interruption that Tune's state did not record: never train twice
        tune.report(done[-1]["metrics"])
        return
    cfg = apply_overrides(from_dict(base), [f"{k}={v}" for k, v in params.items()])
    cfg = update_dataclass(cfg, {"train": {"name": job}, "tracking": {"register_as": "", "alias": ""}})
    _log_event(folder, {"trial": trial_id, "event": "start", "job": job, "params": params})

    class ReportUntilTheEnd(TuneReportCallback):
        """Forward every report but the last: that one is sent below, once the model is logged,
        so a scheduler's decision at the final report cannot cut a finished trial short."""

        def after_report(self, run_context, metrics, checkpoint):
            if metrics and metrics[0].get("step", 0) < total_steps:
                super().after_report(run_context, metrics, checkpoint)

    total_steps = sweep["steps"]
    result = fit(cfg, parent_run_id=sweep["parent_run_id"], callbacks=[ReportUntilTheEnd()])
    final = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}
    _log_event(folder, {"trial": trial_id, "event": "end", "job": job, "run_id": result.run_id, "metrics": final})
    tune.report(final)


# ----------------------------------------------------------------------------- the sweep


@dataclass
class SweepResult:
    name: str
    folder: Path
    parent_run_id: str | None
    table: Any  # pandas DataFrame, one row per trial
    best: dict[str, Any]
    model: dict[str, Any]


def run(base: ExperimentConfig, sw: SweepConfig, *, ray_init: dict[str, Any] | None = None) -> SweepResult:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from rayrcm.config import to_dict
    from rayrcm.orchestration.trainer import ensure_ray, prepare

    base, sw, parsed = validate_sweep(base, sw)
    base, uri = prepare(base)  # resolves epochs to steps, storage, tracking, init_from
    # trials run in Tune's per-trial working dirs (on any node): no relative paths may reach them
    path = base.data.path
    if path and Path(path).expanduser().exists():
        path = str(Path(path).expanduser().resolve())
    base = update_dataclass(base, {"tracking": {"uri": uri or base.tracking.uri}, "data": {"path": path}})
    folder = Path(base.train.storage_path) / sw.name
    reports = max(1, base.train.steps // base.train.checkpoint_every)
    parent = None
    if uri:
        params = {"metric": sw.metric, "mode": sw.mode, "scheduler": sw.scheduler, "num_samples": sw.num_samples,
                  "votes": sw.votes, "grace_period": sw.grace_period, "reduction_factor": sw.reduction_factor,
                  **{f"space.{k}": v for k, v in sw.space.items()},
                  **{f"base.{k}": v for k, v in to_flat_dict(base).items()}}
        parent = tracking.start_job_run(uri, base.tracking.experiment, sw.name, params, tags={"rayrcm.stage": "sweep"})
        print(f"[rayrcm] sweep {sw.name}: MLflow parent run {parent} ({uri})", flush=True)
    ensure_ray(**(ray_init or {}))
    trainable = tune.with_parameters(
        _trial, base=to_dict(base),
        sweep={"name": sw.name, "folder": str(folder), "parent_run_id": parent, "steps": base.train.steps})
    # the trial function only waits on its TorchTrainer, whose workers hold the CPUs/GPUs: it asks for
    # no CPU (a fraction would leave the last worker of a full node unplaced), only a token of memory
    # (Tune refuses an empty request)
    trainable = tune.with_resources(trainable, {"memory": 1 << 20})
    max_conc = concurrency(base, sw)
    if sw.scheduler == "asha":
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=reports, grace_period=min(sw.grace_period, reports),
                                  reduction_factor=sw.reduction_factor)
    else:
        scheduler = FIFOScheduler()
    if tune.Tuner.can_restore(str(folder)):
        print(f"[rayrcm] sweep {sw.name}: resuming from {folder}", flush=True)
        tuner = tune.Tuner.restore(str(folder), trainable=trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=tune_space(parsed),
            tune_config=tune.TuneConfig(metric=sw.metric, mode=sw.mode, scheduler=scheduler, num_samples=sw.num_samples,
                                        max_concurrent_trials=max_conc, trial_dirname_creator=lambda t: t.trial_id),
            run_config=tune.RunConfig(name=sw.name, storage_path=base.train.storage_path,
                                      failure_config=tune.FailureConfig(max_failures=sw.max_failures), verbose=1),
        )
    print(f"[rayrcm] sweep {sw.name}: up to {max_conc} concurrent trials, {reports} reports each, "
          f"{sw.scheduler} on {sw.metric} ({sw.mode})", flush=True)
    grid = tuner.fit()
    return _finish(base, sw, uri, parent, folder, grid, list(parsed))


def _finish(base: ExperimentConfig, sw: SweepConfig, uri: str | None, parent: str | None, folder: Path, grid: Any,
            keys: list[str]) -> SweepResult:
    import pandas as pd

    from rayrcm.orchestration.trainer import version_tags

    ends = {e["trial"]: e for e in read_events(folder) if e["event"] == "end"}
    sign = 1 if sw.mode == "max" else -1
    rows = []
    for r in grid:
        trial_id = Path(r.path).name if r.path else ""
        curve = r.metrics_dataframe if r.metrics_dataframe is not None else pd.DataFrame()
        values = curve[sw.metric].dropna().tolist() if sw.metric in curve else []
        end = ends.get(trial_id)
        status = "completed" if end else ("error" if r.error else "stopped")
        best_value = end["metrics"].get("selected_value") if end else None
        if best_value is None and values:
            best_value = (max if sign > 0 else min)(values)
        rows.append({"trial": trial_id, **{k: r.config.get(k) for k in keys}, "status": status, "reports": len(values),
                     sw.metric: best_value if best_value is not None else math.nan,
                     "run_id": end["run_id"] if end else None, "job": f"{sw.name}-{trial_id}"})
    table = pd.DataFrame(rows).sort_values(sw.metric, ascending=sw.mode == "min", na_position="last").reset_index(drop=True)
    done = table[table["status"] == "completed"]
    best = done.iloc[0].to_dict() if len(done) else {}
    model: dict[str, Any] = {}
    stopped = int((table["status"] == "stopped").sum())
    print(f"[rayrcm] sweep {sw.name}: {len(done)} completed, {stopped} stopped early, "
          f"{int((table['status'] == 'error').sum())} failed", flush=True)
    print(table.drop(columns=["run_id", "job"]).to_string(index=False), flush=True)
    if uri and parent:
        client = tracking._client(uri)
        for _, row in table.iterrows():  # runs of trials that ASHA stopped (or that failed) end as KILLED/FAILED
            run_id = row["run_id"] if isinstance(row["run_id"], str) else _run_of_job(client, base.tracking.experiment, row["job"])
            if run_id:
                client.set_tag(run_id, "rayrcm.sweep_status", row["status"])
                # a stopped trial's fit() may have marked its run FAILED as its Train run was torn down
                if row["status"] == "stopped" or client.get_run(run_id).info.status == "RUNNING":
                    client.set_terminated(run_id, status="KILLED" if row["status"] == "stopped" else "FAILED")
        if best:
            cfg_best = apply_overrides(base, [f"{k}={best[k]}" for k in keys])
            model = _register(uri, best["run_id"], sw, version_tags(cfg_best))
            client.log_batch(parent, params=[_param(f"best.{k}", best[k]) for k in keys])
            client.log_metric(parent, f"best_{sw.metric}", float(best[sw.metric]))
            client.set_tag(parent, "rayrcm.best_run_id", best["run_id"])
            if model.get("alias_uri") or model.get("registry_uri"):
                client.set_tag(parent, "rayrcm.registered_model", model.get("alias_uri") or model["registry_uri"])
        _log_summary(client, parent, folder, table, sw, keys)
        tracking.end_run(uri, parent, ok=bool(best))
    if best:
        where = model.get("alias_uri") or model.get("registry_uri") or f"runs:/{best['run_id']}/model"
        print(f"[rayrcm] best trial {best['trial']}: {sw.metric} = {best[sw.metric]:.4f} with "
              + ", ".join(f"{k}={best[k]}" for k in keys) + f"; model {where}", flush=True)
    print(f"[rayrcm] Tune logs: tensorboard --logdir {folder}", flush=True)
    return SweepResult(sw.name, folder, parent, table, best, model)


def _param(key: str, value: Any):
    from mlflow.entities import Param

    return Param(key, str(value))


def _run_of_job(client: Any, experiment: str, job: str) -> str | None:
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    found = client.search_runs([exp.experiment_id], filter_string=f"tags.`{tracking.JOB_TAG}` = '{job}'", max_results=1)
    return found[0].info.run_id if found else None


def _register(uri: str, run_id: str, sw: SweepConfig, tags: dict[str, str]) -> dict[str, Any]:
    """Register the best trial's logged model and point the alias at it."""
    import mlflow

    model_uri = f"runs:/{run_id}/model"
    if not sw.register_as:
        return {"model_uri": model_uri}
    mlflow.set_tracking_uri(uri)
    mv = mlflow.register_model(model_uri, sw.register_as, tags={**tags, "sweep": sw.name})
    client = tracking._client(uri)
    out = {"model_uri": model_uri, "name": sw.register_as, "version": int(mv.version),
           "registry_uri": f"models:/{sw.register_as}/{mv.version}"}
    if sw.alias:
        client.set_registered_model_alias(sw.register_as, sw.alias, mv.version)
        out["alias_uri"] = f"models:/{sw.register_as}@{sw.alias}"
    client.set_tag(run_id, "rayrcm.registered_model", out.get("alias_uri", out["registry_uri"]))
    return out


def _log_summary(client: Any, parent: str, folder: Path, table: Any, sw: SweepConfig, keys: list[str]) -> None:
    """``sweep_summary.csv``/``.md`` and ``metric_vs_params.png`` in the sweep folder and on the parent run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    csv = folder / "sweep_summary.csv"
    table.to_csv(csv, index=False)
    md = folder / "sweep_summary.md"
    cols = ["trial", *keys, "status", "reports", sw.metric]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, row in table.iterrows():
        lines.append("| " + " | ".join(f"{row[c]:.4f}" if isinstance(row[c], float) else str(row[c]) for c in cols) + " |")
    md.write_text("\n".join(lines) + "\n")
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.4), squeeze=False)
    colors = {"completed": "tab:blue", "stopped": "tab:orange", "error": "tab:red"}
    for ax, key in zip(axes[0], keys):
        for status, part in table.groupby("status"):
            x = part[key].astype(float) if part[key].map(lambda v: isinstance(v, (int, float))).all() else part[key].astype(str)
            ax.scatter(x, part[sw.metric], label=status, color=colors.get(status, "gray"))
        ax.set_xlabel(key)
        ax.set_ylabel(sw.metric)
        if key.endswith(("lbd", "lr")) and (table[key].astype(float) > 0).all():
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{sw.name}: {sw.metric} (best per trial)")
    fig.tight_layout()
    png = folder / "metric_vs_params.png"
    fig.savefig(png, dpi=110)
    plt.close(fig)
    for f in (csv, md, png):
        client.log_artifact(parent, str(f))


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
