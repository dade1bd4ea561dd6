"""The driver: validate, open the MLflow run, run the Ray Train job, log and register the model.

A job is one ``train.name`` under ``train.storage_path``: rerunning it resumes from its last
checkpoint. Its resolved config is recorded in ``<storage>/<job>/job_config.json`` before any
training, and a rerun with another config is refused (one line naming the differing keys) before
any Ray or MLflow work and without touching the job's files. Keys that may change on resume
(:data:`RESUME_KEYS`): where and how the job runs, never what it trains: ``train.workers``,
``train.use_gpu``, ``train.max_failures``, ``train.progress_every_s``, ``train.log_every``,
``train.keep_checkpoints``, ``train.storage_path``, ``train.fault_at_step``, ``train.fault_mode``,
``train.plugins``, ``data.num_workers``, ``tracking.uri``, ``tracking.system_metrics`` and
``tracking.flush_timeout_s``.

MLflow: a new job's run is RUNNING from the start; a rerun's existing run is marked RUNNING by
rank 0 at its first training step only, so a rerun that fails before doing any work leaves a
FINISHED run as it was, and any other failure ends the run FAILED.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Callable, Sized
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from rayrcm.config import (
    ExperimentConfig,
    needs_epochs,
    resolve_epochs,
    to_dict,
    to_flat_dict,
    validate,
)
from rayrcm.data.checks import check_dataset
from rayrcm.errors import ConfigError, NonFiniteLoss, TrackingUnavailable
from rayrcm.models.classifier import check_encoder_file
from rayrcm.orchestration import cluster, job_files, lineage, metric_buffer, tracking
from rayrcm.orchestration.train_worker import (
    non_finite_marker,
    read_unsent,
    train_worker,
    write_unsent,
)
from rayrcm.train.checkpoint import MODEL_FILE
from rayrcm.train.selection import EMBEDDING_DIR

if TYPE_CHECKING:
    from ray.train import Checkpoint, Result

JOB_CONFIG_FILE = "job_config.json"  # the resolved config of a job, compared on rerun
RESUME_KEYS = frozenset({  # may differ between runs of one job: where and how it runs, not what it trains
    "train.workers", "train.use_gpu", "train.max_failures", "train.progress_every_s", "train.log_every",
    "train.keep_checkpoints", "train.storage_path", "train.fault_at_step", "train.fault_mode", "train.plugins",
    "data.num_workers", "tracking.uri", "tracking.system_metrics", "tracking.flush_timeout_s",
})


@dataclass
class FitResult:
    job: str
    run_id: str | None
    metrics: dict[str, Any]
    model_file: Path
    model: dict[str, Any] = field(default_factory=dict)  # model_uri, registry_uri, alias_uri


def storage_root(cfg: ExperimentConfig) -> str:
    p = cfg.train.storage_path
    return p if "://" in p else str(Path(p).expanduser().resolve())


def job_config(cfg: ExperimentConfig) -> dict[str, Any]:
    """The recorded config of a job: the flat resolved config, JSON-normalized, minus :data:`RESUME_KEYS`."""
    flat = json.loads(json.dumps(to_flat_dict(cfg), default=str))
    return {k: v for k, v in sorted(flat.items()) if k not in RESUME_KEYS}


def read_job_config(storage: str, job: str) -> dict[str, Any] | None:
    text = job_files.read_text(storage, job, JOB_CONFIG_FILE)
    return json.loads(text) if text is not None else None


def write_job_config(storage: str, job: str, recorded: dict[str, Any]) -> None:
    """Record a job's config (written whole or not at all)."""
    job_files.write_text(storage, job, JOB_CONFIG_FILE, json.dumps(recorded, indent=1, sort_keys=True))


def default_job_config(cfg: ExperimentConfig) -> dict[str, Any]:
    """:func:`job_config` of the defaults for ``cfg``'s method: the value a key has in a job recorded
    before that key existed."""
    from rayrcm.objectives import method_config_class

    return job_config(replace(ExperimentConfig(), method=method_config_class(cfg.method.name)()))


def check_rerun(storage: str, job: str, recorded: dict[str, Any], defaults: dict[str, Any] | None = None) -> bool:
    """Refuse a rerun of ``job`` with another config; True when the job ran before with this one.
    A key the recorded config lacks (added by a later rayrcm) counts as unchanged while it holds
    its default (``defaults``), so upgrading never strands a job."""
    old = read_job_config(storage, job)
    if old is None:
        return False
    defaults = defaults or {}
    diff = [f"{k} ({old.get(k, '<unset>')!r} -> {recorded.get(k, '<unset>')!r})"
            for k in sorted(set(old) | set(recorded)) if old.get(k) != recorded.get(k)
            and not (k not in old and k in defaults and recorded.get(k) == defaults[k])]
    if diff:
        shown = ", ".join(diff[:4]) + (f" and {len(diff) - 4} more" if len(diff) > 4 else "")
        raise ConfigError("train.name", job, f"this job ran with another config: {shown}; rerun it with its own "
                          "config to resume it, or start a new job with --set train.name=<new name>")
    return True


def prepare(cfg: ExperimentConfig, *, job: bool = False) -> tuple[ExperimentConfig, str | None]:
    """Validate everything and resolve URIs before any Ray work; returns (config, tracking uri).
    ``job=True`` (:func:`fit`): ``cfg`` is a training job: a rerun with another config is refused
    before anything is touched, and a new job's config is recorded (:data:`JOB_CONFIG_FILE`); a
    sweep's or a transfer's base config is only checked."""
    cfg = validate(cfg)
    need_val = cfg.method.stage == "classifier" and (cfg.data.val_fraction > 0 or bool(cfg.train.select_metric))
    splits = check_dataset(cfg.data, batch_size=cfg.data.batch_size, need_val=need_val)  # before Ray, one line
    if needs_epochs(cfg):
        cfg = resolve_epochs(cfg, len(cast(Sized, splits.train)))
    batch, workers = cfg.data.batch_size, max(cfg.train.workers, 1)
    if batch % workers:
        raise ConfigError("data.batch_size", batch, f"must be divisible by train.workers={workers} (it is the global batch)")
    given = cfg.train.storage_path
    if "://" not in given and Path(given).expanduser().exists() and not Path(given).expanduser().is_dir():
        raise ConfigError("train.storage_path", given, "is a file; give a folder (created if missing)")
    cfg = replace(cfg, train=replace(cfg.train, storage_path=storage_root(cfg)))
    recorded = job_config(cfg)  # init_from as the user gave it, before it is resolved to a local file
    ran_before = check_rerun(cfg.train.storage_path, cfg.job_name, recorded, default_job_config(cfg)) if job else True
    if cfg.data.path and "://" not in cfg.data.path:  # the workers run in other folders: as the driver read it
        cfg = replace(cfg, data=replace(cfg.data, path=str(Path(cfg.data.path).expanduser().resolve())))
    uri = None
    if cfg.tracking.enabled:
        uri = tracking.normalize_uri(cfg.tracking.uri)
        tracking.check_reachable(uri)
    if cfg.model.init_from:
        dst = Path(cfg.train.storage_path) / cfg.job_name / "init"
        local = tracking.resolve_model(cfg.model.init_from, uri, dst, key="model.init_from")
        check_encoder_file(local, cfg.model, cfg.data.image_size)
        cfg = replace(cfg, model=replace(cfg.model, init_from=str(local)))
    if not ran_before:
        write_job_config(cfg.train.storage_path, cfg.job_name, recorded)
    return cfg, uri


def summary_line(job: str, metrics: dict[str, Any], seconds: float) -> str:
    """``[rayrcm] job: done in 42 s, loss 0.31, test_acc_clean 0.91, ...`` (the test metrics, else validation)."""
    keys = [k for k in metrics if k.startswith("test_") and not k.endswith("_images")]
    keys = keys or [k for k in metrics if k.startswith("val_")]
    shown = [f"{k} {metrics[k]:.4g}" for k in ["loss", *keys] if isinstance(metrics.get(k), (int, float))]
    return f"[rayrcm] {job}: done in {seconds:.0f} s" + (", " + ", ".join(shown) if shown else "")


def version_tags(cfg: ExperimentConfig) -> dict[str, str]:
    tags = {"dataset": cfg.data.name, "method": cfg.method.name, "encoder": cfg.model.encoder, "job": cfg.job_name}
    if hasattr(cfg.method, "sigma"):
        tags["sigma"] = f"{cfg.method.sigma:g}"
    return tags


def remove_untracked_checkpoints(storage: str, job: str, tracked: list[str]) -> int:
    """Remove the job's checkpoint folders Ray Train does not track (one a worker reported just
    before it died, which the retry resumed from or passed by); returns how many."""
    import pyarrow.fs

    fs, root = job_files.job_dir(storage, job)
    fs = fs or pyarrow.fs.LocalFileSystem()
    keep = {Path(p).name for p in tracked}
    gone = 0
    for path in job_files.checkpoint_dirs(fs, root):
        if Path(path).name not in keep:
            fs.delete_dir(path)
            gone += 1
    return gone


def send_unsent(cfg: ExperimentConfig, uri: str, run_id: str, model_file: Path) -> None:
    """The driver's calls after training start here: fail with one line naming the URI when the
    server is away (saying what was kept); else send the metric points rank 0 could not."""
    t, job = cfg.train, cfg.job_name
    unsent = read_unsent(t.storage_path, job)
    reason = tracking.unreachable(uri)
    if reason is not None:
        kept = f" and {len(unsent)} metric points wait in the job folder" if unsent else ""
        raise TrackingUnavailable(uri, reason, f"training finished and its model is {model_file}{kept}; the model was "
                                  "not logged or registered: rerun the same command when the server answers")
    if unsent:
        sent = metric_buffer.send_points(uri, run_id, unsent)
        write_unsent(t.storage_path, job, [])
        print(f"[rayrcm] sent {sent} buffered metric points to {uri}", flush=True)


def non_finite_cause(err: BaseException) -> NonFiniteLoss | None:
    """The :class:`~rayrcm.train.loop.NonFiniteLoss` a worker raised, found in Ray's wrapping of it
    (causes, contexts, per-worker failures), or in its text when the type did not survive."""
    seen: set[int] = set()
    todo: list[Any] = [err]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, NonFiniteLoss):
            return e
        if isinstance(e, BaseException):
            todo += [e.__cause__, e.__context__, getattr(e, "cause", None)]
            failures = getattr(e, "worker_failures", None)
            todo += list(failures.values()) if isinstance(failures, dict) else []
    match = re.search(r"loss is (nan|inf|-inf) at step (\d+)", str(err))
    return NonFiniteLoss(int(match.group(2)), float(match.group(1))) if match else None


def fit(cfg: ExperimentConfig, *, parent_run_id: str | None = None, ray_init: dict[str, Any] | None = None,
        callbacks: list[Any] | None = None, run_name: str | None = None, init_ref: str | None = None,
        tags: dict[str, str] | None = None, live: bool = False) -> FitResult:
    """Run one training stage on Ray Train; resumes when ``cfg.job_name`` ran before.
    ``callbacks``: Ray Train ``UserCallback``s (a sweep passes Tune's ``TuneReportCallback``).
    ``run_name``: the MLflow run's name (default: the job's); ``init_ref``: the reference
    ``model.init_from`` was given as when ``cfg`` holds it resolved already (a sweep's trials);
    ``tags``: extra tags of a new MLflow run; ``live``: a sweep's trial whose driver draws the sweep's
    bar: rank 0 writes ``progress.json`` and the trial prints no lines of its own."""
    say = (lambda line: None) if live else partial(print, flush=True)
    ref = init_ref or cfg.model.init_from  # as the user gave it: prepare() resolves it to a local file
    cfg, uri = prepare(cfg, job=True)
    t, job = cfg.train, cfg.job_name
    cluster.ensure_ray(**(ray_init or {}))
    cluster.require_gpus("train.use_gpu", max(t.workers, 1) if t.use_gpu else 0)
    cluster.require_cpus("train.workers", t.workers, 1.0, max(t.workers, 1))
    run_id = None
    if uri:  # a rerun's run stays as it was (FINISHED, FAILED) until rank 0 starts a step
        if parent_run_id is None and ref and cfg.method.child_of_source:  # a probe: a child of its pretraining run
            parent_run_id = tracking.model_lineage(ref, uri)[0]
        params = {**to_flat_dict(cfg), **({"model.init_from": ref} if ref else {})}
        run_id = tracking.start_job_run(uri, cfg.tracking.experiment, job, params,
                                        tags={"rayrcm.stage": cfg.method.stage, **(tags or {})},
                                        parent_run_id=parent_run_id, reopen=False, run_name=run_name)
        say(f"[rayrcm] MLflow run {run_id} ({uri})")
        if ref:  # the run the encoder came from: a tag and a link each way
            # a sweep's trial: the sweep's run links the source once, not a line per trial on it
            source = lineage.link_source(uri, run_id, ref, back="rayrcm.sweep" not in (tags or {}))
            if source:
                say(f"[rayrcm] {job}: model.init_from {ref} (MLflow run {source})")
    try:
        fit_result = _fit(cfg, run_id, uri, callbacks, say=say if live else None)
    except BaseException:
        if uri and run_id:
            tracking.fail_if_running(uri, run_id)
        raise
    if uri and run_id:
        lineage.finish_run(uri, run_id)
    return fit_result


def _final_checkpoint(result: Result) -> Checkpoint:
    """The checkpoint of a run's last report (with train.workers > 0 rank 0 attaches one to every report)."""
    assert result.checkpoint is not None, "the last report of a training run carries its checkpoint"
    return result.checkpoint


def _fit(cfg: ExperimentConfig, run_id: str | None, uri: str | None, callbacks: list[Any] | None,
         say: Callable[[str], None] | None = None) -> FitResult:
    """``say``: a sweep's trial while the driver draws the sweep's bar takes its lines (and drops them)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from rayrcm.orchestration import live

    t, job = cfg.train, cfg.job_name
    tic = time.perf_counter()
    # a terminal gets a bar drawn here from rank 0's progress file (local or shared storage); a sweep's
    # trial writes the file for the sweep's bar
    progress = Path(t.storage_path) / job / live.PROGRESS_FILE
    sink = "://" not in t.storage_path and (say is not None or live.interactive() and not callbacks)
    if sink:
        progress.unlink(missing_ok=True)
    follow = live.FollowProgress(progress, job, t.steps) if sink and say is None else None
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"cfg": to_dict(cfg), "run_id": run_id, "tracking_uri": uri, "live": sink,
                           "quiet": say is not None},
        scaling_config=ray.train.ScalingConfig(num_workers=t.workers, use_gpu=t.use_gpu,
                                              placement_strategy=t.placement),
        run_config=ray.train.RunConfig(
            name=job,
            storage_path=t.storage_path,
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=t.keep_checkpoints),
            callbacks=callbacks or None,
        ),
    )
    if "://" not in t.storage_path:
        non_finite_marker(t.storage_path, job).unlink(missing_ok=True)  # this run meets its own losses
    try:
        if follow is not None:
            follow.start()
        result = trainer.fit()
    except Exception as err:
        found = non_finite_cause(err)
        if found is not None:  # one line for the user, not Ray's traceback of the worker
            raise found from None
        raise
    finally:
        if follow is not None:
            follow.close()
    out_dir = job_files.model_dir(t.storage_path, job)
    out_dir.mkdir(parents=True, exist_ok=True)
    if t.workers > 0:  # train.workers=0 (Ray Train's local mode) keeps no checkpoint: the worker wrote model.pt
        final = _final_checkpoint(result)
        with final.as_directory() as d:
            shutil.copy2(Path(d) / MODEL_FILE, out_dir / MODEL_FILE)
        remove_untracked_checkpoints(t.storage_path, job, [c.path for c, _ in (result.best_checkpoints or [])] + [final.path])
    fit_result = FitResult(job, run_id, dict(result.metrics or {}), out_dir / MODEL_FILE)
    (say or partial(print, flush=True))(summary_line(job, fit_result.metrics, time.perf_counter() - tic))
    if uri and run_id:
        send_unsent(cfg, uri, run_id, out_dir / MODEL_FILE)
        fit_result.model = tracking.log_model(uri, run_id, out_dir / MODEL_FILE, register_as=cfg.tracking.register_as,
                                              alias=cfg.tracking.alias, version_tags=version_tags(cfg))
        _log_embedding(t.storage_path, job, uri, run_id)
    return fit_result


def _log_embedding(storage: str, job: str, uri: str, run_id: str) -> None:
    """An encoder stage's t-SNE map of its test features (``<job>/embedding/``, written by rank 0) to its run."""
    plots = Path(storage) / job / EMBEDDING_DIR
    if "://" not in storage and plots.is_dir():
        tracking.log_artifacts(uri, run_id, sorted(plots.iterdir()), EMBEDDING_DIR)
