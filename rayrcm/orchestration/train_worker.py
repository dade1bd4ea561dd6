"""The Ray Train worker function: wiring between Ray, MLflow and the pure training session.

Everything that decides what is trained lives in :mod:`rayrcm.train.session` (build, steps,
per-epoch plans) and :mod:`rayrcm.train.selection` (validation, the kept model, test metrics).
Here: the worker's place in the job, resuming, DDP, and the reports. Every worker calls
``ray.train.report`` at the same steps (it is a barrier); rank 0 attaches the checkpoint and is the
only process that writes to MLflow or the console. Rank 0 marks the job's MLflow run RUNNING at the
first step it trains (a rerun that fails before leaves the run as it was).

* Checkpoints never wait on the tracking server: rank 0's metrics go through a
  :class:`~rayrcm.orchestration.metric_buffer.BufferedMetricLogger`, so an outage is one warning line
  while training and checkpointing go on; points still unsent at the end are kept in
  ``<job>/unsent_metrics.jsonl`` and sent by the job's next run (the driver says so).
* Resuming takes the newest *complete* checkpoint of the job (its ``checkpoint.json`` lists every
  file with its size): Ray Train's own, or a newer one a worker reported just before it died, which
  Ray Train never registered. The driver removes checkpoint folders Ray Train does not track once
  the job is done, so a reported checkpoint is either resumed from or removed.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from rayrcm.config import from_dict
from rayrcm.errors import NonFiniteLoss
from rayrcm.orchestration.job_files import checkpoint_dirs, model_dir, read_text, remove, write_text
from rayrcm.plugins import load_plugins
from rayrcm.train.checkpoint import MANIFEST_FILE, MODEL_FILE, load_state
from rayrcm.train.progress import Progress
from rayrcm.train.selection import Validator, embedding_plot, test_metrics
from rayrcm.train.session import Session, build_session, restore, run_training, save

UNSENT_FILE = "unsent_metrics.jsonl"  # metric points the tracking server did not take, one JSON list per line
PENDING_FILE = "pending_metrics.jsonl"  # in a checkpoint: rank 0's points not sent when it was saved


def fault_marker(storage_path: str, job: str, step: int) -> Path:
    return Path(storage_path) / job / f".fault_injected_at_{step}"


def non_finite_marker(storage_path: str, job: str) -> Path:
    """Written when a worker's loss became non-finite: Ray Train's retry of the same deterministic
    steps would meet it again, so the retried workers stop at once (the driver clears it first)."""
    return Path(storage_path) / job / ".non_finite_loss.json"


def _inject_fault(storage_path: str, job: str, step: int, mode: str = "raise") -> None:
    """Test hook: fail once at ``step`` (raise, or ``exit``: the process dies at once, as a killed
    worker); a marker on shared storage keeps the retry from failing again."""
    marker = fault_marker(storage_path, job, step)
    if not marker.exists():
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
        if mode == "exit":
            os._exit(1)
        raise RuntimeError(f"injected worker failure at step {step} (train.fault_at_step)")


def read_unsent(storage_path: str, job: str) -> list[tuple[int, str, float, int]]:
    return _points(read_text(storage_path, job, UNSENT_FILE) or "")


def _lines(points: list) -> str:
    return "".join(json.dumps(list(p)) + "\n" for p in points)


def _points(text: str) -> list[tuple[int, str, float, int]]:
    return [tuple(json.loads(line)) for line in text.splitlines() if line.strip()]


def write_unsent(storage_path: str, job: str, points: list) -> str | None:
    """Keep ``points`` for the job's next run (or remove the file when there are none)."""
    if not points:
        remove(storage_path, job, UNSENT_FILE)
        return None
    return write_text(storage_path, job, UNSENT_FILE, _lines(points))


def say(message: str) -> None:
    """One console line from the worker's real stdout (Ray forwards it to the driver once).

    Ray Train patches ``print`` and tees when a library (MLflow here) has wrapped
    ``sys.stdout``, which would show every line twice.
    """
    print(message, file=sys.__stdout__, flush=True)


class _Rank0:
    """Rank 0's MLflow metric log and console; no-ops on the other ranks."""

    def __init__(self, config: dict[str, Any], s: Session) -> None:
        self.logger = None
        self._running = False
        self.rank0 = s.rank == 0
        self.cfg = s.cfg
        self.quiet = bool(config.get("quiet"))  # a sweep's trial under the driver's sweep bar: warnings only
        if self.rank0 and config.get("run_id"):
            from rayrcm.orchestration.metric_buffer import BufferedMetricLogger

            pending = read_unsent(s.cfg.train.storage_path, s.cfg.job_name)
            if pending:
                self.say(f"[rayrcm] sending {len(pending)} metric points kept from the job's last run")
            self.logger = BufferedMetricLogger(config["tracking_uri"], config["run_id"], say=self.warn, pending=pending,
                                               system_metrics=s.cfg.tracking.system_metrics)
        sink = None
        if self.rank0 and config.get("live"):  # the driver draws a bar from <job>/progress.json
            from rayrcm.orchestration.job_files import write_text
            from rayrcm.orchestration.live import PROGRESS_FILE

            storage, job = s.cfg.train.storage_path, s.cfg.job_name

            def sink(text: str) -> None:
                write_text(storage, job, PROGRESS_FILE, text)
        self.progress = Progress(s.cfg.job_name, s.cfg.train.steps, s.start, s.cfg.train.progress_every_s, self.say,
                                 sink=sink)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if self.logger is not None:
            self.logger.log(step, metrics)

    def pending(self) -> list:
        return self.logger.pending() if self.logger is not None else []

    def add(self, points: list) -> None:
        if self.logger is not None and points:
            self.logger.add(points)

    def started(self, config: dict[str, Any]) -> None:
        """Rank 0, at the first step it trains: the job's run is RUNNING (again)."""
        if self.logger is not None and not self._running:
            self.logger.mark_running()
        self._running = True

    def say(self, line: str, warning: bool = False) -> None:
        if self.rank0 and (warning or not self.quiet):
            say(line)

    def warn(self, line: str) -> None:
        """A line even under a sweep's bar (the tracking server's outage and return)."""
        self.say(line, warning=True)

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        if self.rank0:
            self.progress(step, metrics)
            self.log(step, metrics)

    def close(self) -> None:
        """Send the buffered metrics (waiting at most ``tracking.flush_timeout_s``); keep the rest."""
        if self.logger is None:
            return
        t = self.cfg.train
        unsent = self.logger.close(self.cfg.tracking.flush_timeout_s)
        where = write_unsent(t.storage_path, self.cfg.job_name, unsent)
        if where:
            self.say(f"[rayrcm] warning: {len(unsent)} metric points could not be sent to {self.logger.uri}; "
                     f"kept in {where} for the job's next run", warning=True)


def complete_step(fs: Any, path: str) -> int | None:
    """The step of the checkpoint folder ``path`` when every file its manifest lists is there
    with its size; None for an incomplete folder or one without a manifest."""
    import pyarrow.fs

    try:
        with fs.open_input_stream(f"{path}/{MANIFEST_FILE}") as f:
            manifest = json.loads(f.read().decode())
        for name, size in manifest["files"].items():
            info = fs.get_file_info(f"{path}/{name}")
            if info.type != pyarrow.fs.FileType.File or info.size != size:
                return None
        return int(manifest["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _resume(s: Session, out: _Rank0) -> None:
    """Restore the newest complete checkpoint: Ray Train's, or a newer untracked one (and queue the
    metric points rank 0 had not sent when it was saved)."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    try:
        storage = ray.train.get_context().get_storage()
    except NotImplementedError:  # Ray Train's local mode (train.workers=0): no storage to scan
        storage = None
    fs = storage.storage_filesystem if storage is not None else None
    own = complete_step(ckpt.filesystem, ckpt.path) if ckpt is not None else None
    best: tuple[int, str] | None = None
    for path in checkpoint_dirs(fs, storage.experiment_fs_path) if storage is not None else []:
        step = complete_step(fs, path)
        if step is not None and (own is None or step > own) and (best is None or step > best[0]):
            best = (step, path)
    if best is not None and (ckpt is None or own is not None):  # a tracked file without manifest: Ray's wins
        out.say(f"[rayrcm] resuming from the step-{best[0]} checkpoint {Path(best[1]).name}, reported just before a "
            "failure (Ray Train had not registered it)")
        ckpt = ray.train.Checkpoint(best[1], filesystem=fs)
    if ckpt is not None:
        with ckpt.as_directory() as d:
            restore(s, load_state(d))
            if (Path(d) / PENDING_FILE).is_file():
                out.add(_points((Path(d) / PENDING_FILE).read_text()))


def _report(s: Session, out: _Rank0, step: int, metrics: dict[str, float], final: bool = False) -> None:
    """Every worker reports (a barrier); rank 0 attaches the checkpoint (with ``model.pt`` at the end,
    and the metric points not sent yet)."""
    import ray.train

    with tempfile.TemporaryDirectory() as d:
        checkpoint = None
        if s.rank == 0:
            pending = out.pending()
            if pending:
                (Path(d) / PENDING_FILE).write_text(_lines(pending))
            save(s, d, step, final=final)
            checkpoint = ray.train.Checkpoint.from_directory(d)
            if final and s.cfg.train.workers == 0:  # local mode keeps no checkpoint folder after report()
                folder = model_dir(s.cfg.train.storage_path, s.cfg.job_name)
                folder.mkdir(parents=True, exist_ok=True)
                shutil.copy2(Path(d) / MODEL_FILE, folder / MODEL_FILE)
        ray.train.report({"step": step, **metrics}, checkpoint=checkpoint)
    t = s.cfg.train
    if step == t.fault_at_step and t.fault_mode == "exit" and s.rank == 0:
        _inject_fault(t.storage_path, s.cfg.job_name, step, "exit")


def _nodes(node_rank: int, s: Session) -> int:
    """How many nodes the job's workers are on (the largest node rank + 1, over the workers)."""
    if s.world == 1:
        return 1
    import torch
    import torch.distributed as dist

    top = torch.tensor([node_rank], dtype=torch.int64, device=s.device)
    dist.all_reduce(top, op=dist.ReduceOp.MAX)
    return int(top.item()) + 1


def train_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    load_plugins(config["cfg"]["train"].get("plugins", ()))
    cfg = from_dict(config["cfg"])
    t, ctx = cfg.train, ray.train.get_context()
    s = build_session(cfg, config["cfg"], device=ray.train.torch.get_device(), rank=ctx.get_world_rank(),
                      world=ctx.get_world_size())
    out = _Rank0(config, s)
    _resume(s, out)
    out.progress.start = s.start
    s.objective.to(s.device)
    model = ray.train.torch.prepare_model(s.objective) if s.world > 1 else s.objective
    nodes = _nodes(ctx.get_node_rank(), s)  # a collective: every worker
    out.say(f"[rayrcm] {cfg.job_name}: {'resuming at' if s.start else 'starting'} step {s.start}/{t.steps}, "
            f"{s.world} worker(s) on {nodes} node(s), {len(s.train_set)} training images")
    validator = Validator(s, out.log, out.say)

    def checkpoint(step: int, metrics: dict[str, float]) -> None:
        val = validator(step)
        out.progress.validated(val, t.select_metric)
        _report(s, out, step, {**metrics, **val})

    def before(step: int) -> None:
        out.started(config)
        if step == t.fault_at_step and t.fault_mode == "raise" and s.rank == 0:
            _inject_fault(t.storage_path, cfg.job_name, step)

    marker = non_finite_marker(t.storage_path, cfg.job_name)
    if marker.is_file():  # a retry after a non-finite loss: the same steps would reach it again
        raise NonFiniteLoss(**json.loads(marker.read_text()))
    try:
        metrics = run_training(s, model, on_log=out.on_log, on_checkpoint=checkpoint, log=out.log, say=out.say,
                               before_step=before)
    except NonFiniteLoss as err:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps({"step": err.step, "value": err.value}))
        raise
    final = validator.finish()
    tested = test_metrics(s, out.say)
    embedding_plot(s, out.say)
    if tested or final:  # validation metrics were logged by the validator
        out.log(t.steps, {k: v for k, v in {**final, **tested}.items() if not k.startswith("val_")})
    _report(s, out, t.steps, {**metrics, **final, **tested}, final=True)
    out.close()
