"""Hyperparameter sweeps: Ray Tune over any config keys, each trial a Ray Train run, ASHA early
stopping, one MLflow parent run per sweep and a child run per trial, the best model registered.

Shape (Ray 2.60, Train V2): a Tune *function* trainable per trial builds and fits a
``TorchTrainer`` (:func:`rayrcm.orchestration.trainer.fit`), so a trial can use several workers
or GPUs; Tune's ``TuneReportCallback`` forwards every ``ray.train.report`` of rank 0 to Tune.
Trials report at every checkpoint, i.e. every ``report_epochs`` epochs.

The metric. ASHA compares trials on ``val_smoothed_acc_sigma_<s>`` by default: on the held-out
validation split, the fraction of images whose majority vote over ``votes`` Gaussian noise draws
at the *certification* sigma ``s`` equals the label (the ``smoothed`` evaluation, added to the
trials' ``train.evals``). That is a Monte Carlo estimate of the smoothed classifier's accuracy,
i.e. of certified accuracy at radius 0 (Cohen et al. 2019) without the abstentions; one noise
draw (``val_acc_sigma_<s>``) is the base classifier's noisy accuracy and ranks
consistency-regularized models worse than their smoothed accuracy does. The certification sigma
stays fixed while a sweep varies the training noise (``method.sigma``).

Search spaces and the sweep's settings: :mod:`rayrcm.orchestration.sweep_space`; the summary
table and plot: :mod:`rayrcm.orchestration.sweep_report`; every MLflow call goes through
:mod:`rayrcm.orchestration.tracking`. Their public names are importable from here too.

Resume: the sweep's Tune experiment lives in ``<train.storage_path>/<sweep name>``; running the
same command again restores it (``Tuner.restore``, errored trials retried). A trial's Train run is
named ``<sweep>-<trial id>``, so a restarted trial resumes from its own Train checkpoints, and a
trial whose run already finished reports its recorded result instead of training again:
``trials.jsonl`` in the sweep folder records every start and end.

Readable: a trial is named by its values (``lbd=5 lr=0.002``) in MLflow (the run name; its job
stays ``<sweep>-<trial id>``), in Tune's folders and in TensorBoard, whose scalars are the trial's
own metrics against the training step (:mod:`rayrcm.orchestration.sweep_tensorboard`). Tune's
status tables show with ``--verbose`` only; the sweep ends with rayrcm's table of trials. In a
terminal the sweep is one live bar (steps of all trials, trials done and running, the best final
metric so far), drawn from ``trials.jsonl`` and each trial's ``progress.json``; in a job log each
trial prints its own progress lines.

MLflow: the parent run's description links the best trial and its registered model; each trial's
links its sweep; a sweep from a pretrained encoder (``model.init_from``) logs the reference as
given, tags ``rayrcm.source_run_id`` and links that run. The best model gets the sweep's own
alias by default; moving an alias that another job set needs ``--sweep move_alias=true``, and
every move prints and tags ``alias name@alias: vN -> vM``.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from rayrcm.config import ExperimentConfig, apply_overrides, to_flat_dict, update_dataclass
from rayrcm.errors import ConfigError, RunFailed
from rayrcm.orchestration import console, job_files, lineage, live, tracking
from rayrcm.orchestration.sweep_report import trial_table, write_summary
from rayrcm.orchestration.sweep_space import (
    KINDS,
    SCHEDULERS,
    SweepConfig,
    check_space,
    config_from_args,
    default_metric,
    parse_spec,
    sweep_alias,
    trial_base,
    trial_label,
    trial_values,
    tune_space,
    validate_sweep,
)

__all__ = ["KINDS", "SCHEDULERS", "SWEEP_TAG", "TRIALS_LOG", "SweepConfig", "SweepResult", "check_space",
           "concurrency", "config_from_args", "default_metric", "parse_spec", "read_events", "run", "sweep_alias",
           "trial_base", "trial_label", "trial_table", "tune_space", "validate_sweep", "write_summary"]

TRIALS_LOG = "trials.jsonl"
SWEEP_TAG = tracking.SWEEP_VERSION_TAG  # tag of the registered model version: the sweep's name
MOVE_ALIAS = "sweep.move_alias=true (--sweep move_alias=true)"


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
    label = trial_label(params, sweep["label_keys"])

    class ReportUntilTheEnd(TuneReportCallback):
        """Forward every report but the last: that one is sent below, once the model is logged,
        so a scheduler's decision at the final report cannot cut a finished trial short."""

        def after_report(self, run_context, metrics, checkpoint):
            if metrics and metrics[0].get("step", 0) < total_steps:
                super().after_report(run_context, metrics, checkpoint)

    total_steps = sweep["steps"]
    result = fit(cfg, parent_run_id=sweep["parent_run_id"], callbacks=[ReportUntilTheEnd()],
                 run_name=f"{label} [{trial_id}]" if label else job, init_ref=sweep["init_ref"],
                 tags={"rayrcm.sweep": sweep["name"], "rayrcm.trial": trial_id}, live=sweep["live"])
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


def _absolute_paths(base: ExperimentConfig, uri: str | None) -> ExperimentConfig:
    """Trials run in Tune's per-trial working dirs (on any node): no relative path may reach them."""
    path = base.data.path
    if path and Path(path).expanduser().exists():
        path = str(Path(path).expanduser().resolve())
    return update_dataclass(base, {"tracking": {"uri": uri or base.tracking.uri}, "data": {"path": path}})


def _start_parent(uri: str | None, base: ExperimentConfig, sw: SweepConfig, init_ref: str | None) -> str | None:
    """The sweep's MLflow parent run (reused when the sweep is run again), or None without tracking."""
    if not uri:
        return None
    params = {"metric": sw.metric, "mode": sw.mode, "scheduler": sw.scheduler, "num_samples": sw.num_samples,
              "votes": sw.votes, "grace_period": sw.grace_period, "reduction_factor": sw.reduction_factor,
              **{f"space.{k}": v for k, v in sw.space.items()},
              **{f"base.{k}": v for k, v in to_flat_dict(base).items()},
              **({"base.model.init_from": init_ref} if init_ref else {})}
    parent = tracking.start_job_run(uri, base.tracking.experiment, sw.name, params, tags={"rayrcm.stage": "sweep"})
    print(f"[rayrcm] sweep {sw.name}: MLflow parent run {parent} ({uri})", flush=True)
    if init_ref:
        lineage.link_source(uri, parent, init_ref)
    return parent


def label_keys(parsed: dict[str, tuple[str, list[Any]]]) -> list[str]:
    """The keys whose values tell trials apart (all keys when none does)."""
    varying = [k for k, (kind, vals) in parsed.items() if kind != "const" and not (kind == "grid" and len(vals) == 1)]
    return varying or list(parsed)


class TrialNames:
    """Tune's trial names and folder names: the trial id and its values (``a3d56_00000-lbd=5,lr=0.002``)."""

    def __init__(self, keys: list[str]) -> None:
        self.keys = keys

    def __call__(self, trial: Any) -> str:
        safe = ",".join(re.sub(r"[^A-Za-z0-9_.=+-]", "_", v) for v in trial_values(trial.config, self.keys))[:120]
        return f"{trial.trial_id}-{safe}" if safe else trial.trial_id


def _tuner(trainable: Any, base: ExperimentConfig, sw: SweepConfig, parsed: dict[str, Any], folder: Path,
           reports: int, max_conc: int) -> Any:
    """A new Tuner, or the sweep's Tune experiment restored from ``folder``."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

    from rayrcm.orchestration.console import is_verbose
    from rayrcm.orchestration.sweep_tensorboard import StepScalars

    if tune.Tuner.can_restore(str(folder)):
        print(f"[rayrcm] sweep {sw.name}: resuming from {folder}", flush=True)
        return tune.Tuner.restore(str(folder), trainable=trainable, resume_errored=True)
    scheduler: TrialScheduler
    if sw.scheduler == "asha":
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=reports, grace_period=min(sw.grace_period, reports),
                                  reduction_factor=sw.reduction_factor)
    else:
        scheduler = FIFOScheduler()
    names = TrialNames(label_keys(parsed))
    return tune.Tuner(
        trainable,
        param_space=tune_space(parsed),
        tune_config=tune.TuneConfig(metric=sw.metric, mode=sw.mode, scheduler=scheduler, num_samples=sw.num_samples,
                                    max_concurrent_trials=max_conc, trial_name_creator=names,
                                    trial_dirname_creator=names),
        # Tune's status tables only with --verbose: rayrcm prints its own table of trials at the end
        run_config=tune.RunConfig(name=sw.name, storage_path=base.train.storage_path, callbacks=[StepScalars(sw.metric)],
                                  failure_config=tune.FailureConfig(max_failures=sw.max_failures),
                                  verbose=2 if is_verbose() else 0),
    )


def run(base: ExperimentConfig, sw: SweepConfig, *, ray_init: dict[str, Any] | None = None) -> SweepResult:
    from ray import tune

    from rayrcm.config import to_dict
    from rayrcm.orchestration.cluster import ensure_ray
    from rayrcm.orchestration.trainer import prepare

    base, sw, parsed = validate_sweep(base, sw)
    init_ref = base.model.init_from  # as the user gave it: prepare() resolves it to a local file
    base, uri = prepare(base)  # resolves epochs to steps, storage, tracking, init_from
    if uri and not sw.move_alias:  # before any training: never move another job's alias unasked
        tracking.check_alias_owner(uri, sw.register_as, sw.alias, SWEEP_TAG, sw.name, key="sweep.alias",
                                   allow=MOVE_ALIAS)
    base = _absolute_paths(base, uri)
    folder = Path(base.train.storage_path) / sw.name
    reports = max(1, base.train.steps // base.train.checkpoint_every)
    parent = _start_parent(uri, base, sw, init_ref)
    ensure_ray(**(ray_init or {}))
    bar = live.interactive() and "://" not in base.train.storage_path  # else each trial prints its lines
    trainable = tune.with_parameters(
        _trial, base=to_dict(base),
        sweep={"name": sw.name, "folder": str(folder), "parent_run_id": parent, "steps": base.train.steps,
               "init_ref": init_ref, "label_keys": label_keys(parsed), "live": bar})
    # the trial function only waits on its TorchTrainer, whose workers hold the CPUs/GPUs: it asks for
    # no CPU (a fraction would leave the last worker of a full node unplaced), only a token of memory
    # (Tune refuses an empty request)
    trainable = tune.with_resources(trainable, {"memory": 1 << 20})
    max_conc = concurrency(base, sw)
    tuner = _tuner(trainable, base, sw, parsed, folder, reports, max_conc)
    print(f"[rayrcm] sweep {sw.name}: up to {max_conc} concurrent trials, {reports} reports each, "
          f"{sw.scheduler} on {sw.metric} ({sw.mode})", flush=True)
    follow = _follow(base, sw, parsed, folder) if bar else None
    try:
        with console.quiet_tune():
            grid = tuner.fit()
    finally:
        if follow is not None:
            follow.close(complete=True, postfix=sweep_state(folder, base.train.storage_path, 0, 0, sw.metric, sw.mode,
                                                            final=True)["postfix"])
    return _finish(base, sw, uri, parent, folder, grid, list(parsed))


def sweep_state(folder: Path, storage: str, trials: int, steps: int, metric: str, mode: str,
                final: bool = False) -> dict[str, Any]:
    """The sweep bar's state: the steps done by all trials (``trials.jsonl`` and each running trial's
    ``progress.json``; an ended trial counts whole), trials done and running, the best final metric.
    ``final``: the sweep has ended, so a trial that started and never reported its end was stopped
    early by the scheduler (or failed), not running."""
    events = read_events(folder)
    jobs = {e["trial"]: e["job"] for e in events if e["event"] == "start"}
    ends = {e["trial"]: e["metrics"] for e in events if e["event"] == "end"}
    done = 0
    for trial, job in jobs.items():
        if trial in ends:
            done += steps
            continue
        state = live.read_state(Path(storage) / job / live.PROGRESS_FILE)
        done += min(int(state["step"]), steps) if state else 0
    values = [m[metric] for m in ends.values() if isinstance(m.get(metric), (int, float))]
    shown = [f"trials {len(ends)}/{trials} done, {len(jobs) - len(ends)} running"]
    if final:
        shown = [f"{len(ends)} trials completed, {len(jobs) - len(ends)} stopped early or failed"]
    shown += [f"best {metric} {(max if mode == 'max' else min)(values):.4g}"] if values else []
    return {"step": done, "total": trials * steps, "start": 0, "postfix": ", ".join(shown)}


def _follow(base: ExperimentConfig, sw: SweepConfig, parsed: dict[str, Any], folder: Path) -> live.FollowProgress:
    """The sweep's bar, drawn from its trials' files while Tune runs them."""
    grid = [len(values) for kind, values in parsed.values() if kind == "grid"]
    trials = math.prod(grid) * sw.num_samples
    steps = base.train.steps
    follow = live.FollowProgress(partial(sweep_state, folder, base.train.storage_path, trials, steps, sw.metric,
                                         sw.mode), f"sweep {sw.name}", trials * steps)
    follow.start()
    return follow


def _close_trial_runs(uri: str, experiment: str, table: Any, parent: str, keys: list[str]) -> None:
    """Tag every trial's run with its sweep status and link it to the sweep's run; runs of trials
    that ASHA stopped end FINISHED (a scheduler's decision, not a failure: the tag
    ``rayrcm.sweep_status=stopped`` tells them apart), those that failed FAILED."""
    sweep_link = lineage.run_link(uri, parent)
    for _, row in table.iterrows():
        run_id = row["run_id"] if isinstance(row["run_id"], str) else tracking.find_job_run(uri, experiment, row["job"])
        if not run_id:
            continue
        tracking.set_tags(uri, run_id, {"rayrcm.sweep_status": row["status"]})
        values = ", ".join(f"{k}={row[k]}" for k in keys)
        lineage.add_note(uri, run_id, f"Trial {row['trial']} of sweep {sweep_link}: {values} ({row['status']}).")
        # a stopped trial's fit() may have marked its run FAILED as its Train run was torn down
        if row["status"] == "stopped" or tracking.run_status(uri, run_id) == "RUNNING":
            tracking.terminate(uri, run_id, "FINISHED" if row["status"] == "stopped" else "FAILED")


def _log_best(uri: str, parent: str, base: ExperimentConfig, sw: SweepConfig, best: dict[str, Any],
              keys: list[str]) -> dict[str, Any]:
    """Register the best trial's model (tagged like a training job's, plus the sweep's name) and
    record the best values, metric and run on the parent run. The alias is checked again: another
    job may have taken it while the sweep ran."""
    from rayrcm.orchestration.trainer import version_tags

    model_uri = f"runs:/{best['run_id']}/model"
    trial_cfg = apply_overrides(base, [f"{k}={best[k]}" for k in keys])
    tags = {**version_tags(trial_cfg), "job": best["job"], SWEEP_TAG: sw.name}
    alias = sw.alias
    if alias and not sw.move_alias:
        try:
            tracking.check_alias_owner(uri, sw.register_as, alias, SWEEP_TAG, sw.name, key="sweep.alias",
                                       allow=MOVE_ALIAS)
        except ConfigError as err:
            print(f"[rayrcm] sweep {sw.name}: alias not moved: {err}", flush=True)
            alias = ""
    model = {"model_uri": model_uri, **tracking.register(uri, model_uri, best["run_id"], sw.register_as, alias, tags)}
    tracking.log_params(uri, parent, {f"best.{k}": best[k] for k in keys})
    tracking.log_metrics(uri, parent, {f"best_{sw.metric}": float(best[sw.metric])})
    parent_tags = {"rayrcm.best_run_id": best["run_id"]}
    if model.get("alias_uri") or model.get("registry_uri"):
        parent_tags["rayrcm.registered_model"] = model.get("alias_uri") or model["registry_uri"]
    if model.get("alias_change"):
        parent_tags[tracking.ALIAS_CHANGE_TAG] = model["alias_change"]
    tracking.set_tags(uri, parent, parent_tags)
    where = model.get("alias_uri") or model.get("registry_uri") or model_uri
    lineage.add_note(uri, parent, f"Best trial: {lineage.run_link(uri, best['run_id'])} with "
                      + ", ".join(f"{k}={best[k]}" for k in keys) + f": {sw.metric} = {float(best[sw.metric]):.4f}; "
                      f"model `{where}`. Certify it with `--model {where}`: the certification run is a child of "
                      "the trial's run.")
    return model


def _finish(base: ExperimentConfig, sw: SweepConfig, uri: str | None, parent: str | None, folder: Path, grid: Any,
            keys: list[str]) -> SweepResult:
    ends = {e["trial"]: e for e in read_events(folder) if e["event"] == "end"}
    table = trial_table(grid, ends, sw.name, sw.metric, sw.mode, keys)
    done = table[table["status"] == "completed"]
    best = done.iloc[0].to_dict() if len(done) else {}
    counts = table["status"].value_counts()
    print(f"[rayrcm] sweep {sw.name}: {len(done)} completed, {int(counts.get('stopped', 0))} stopped early, "
          f"{int(counts.get('error', 0))} failed", flush=True)
    print(table.drop(columns=["run_id", "job"]).to_string(index=False), flush=True)
    files = write_summary(folder, table, sw.name, sw.metric, keys)
    model: dict[str, Any] = {}
    if uri and parent:
        _close_trial_runs(uri, base.tracking.experiment, table, parent, keys)
        if best:
            model = _log_best(uri, parent, base, sw, best, keys)
        tracking.log_artifacts(uri, parent, files)
        tracking.end_run(uri, parent, ok=bool(best))
    if best:
        where = (model.get("alias_uri") or model.get("registry_uri")
                 or (f"runs:/{best['run_id']}/model" if isinstance(best.get("run_id"), str) else
                     str(job_files.model_dir(base.train.storage_path, best["job"]) / "model.pt")))
        print(f"[rayrcm] best trial {best['trial']}: {sw.metric} = {best[sw.metric]:.4f} with "
              + ", ".join(f"{k}={best[k]}" for k in keys) + f"; model {where}", flush=True)
    print(f"[rayrcm] summary: {folder / 'sweep_summary.md'}; Tune logs: tensorboard --logdir {folder}", flush=True)
    if not best and int(counts.get("error", 0)):  # every trial failed: the sweep failed (exit 1), not done
        raise RunFailed(f"sweep {sw.name}: no trial completed ({int(counts.get('error', 0))} failed); "
                        f"the trials' errors are in {folder}")
    return SweepResult(sw.name, folder, parent, table, best, model)
