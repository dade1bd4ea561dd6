"""The Ray Train worker function: wiring between Ray, MLflow and the pure training session.

Everything that decides what is trained lives in :mod:`rayrcm.train.session` (build, steps,
per-epoch plans) and :mod:`rayrcm.train.selection` (validation, the kept model, test metrics).
Here: the worker's place in the job, resuming from Ray's checkpoint, DDP, and the reports. Every
worker calls ``ray.train.report`` at the same steps (it is a barrier); rank 0 attaches the
checkpoint and is the only process that writes to MLflow or the console. Rank 0 marks the job's
MLflow run RUNNING at the first step it trains (a rerun that fails before leaves the run as it was).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from rayrcm.config import from_dict
from rayrcm.errors import NonFiniteLoss
from rayrcm.plugins import load_plugins
from rayrcm.train.checkpoint import load_state
from rayrcm.train.progress import Progress
from rayrcm.train.selection import Validator, test_metrics
from rayrcm.train.session import Session, build_session, restore, run_training, save


def fault_marker(storage_path: str, job: str, step: int) -> Path:
    return Path(storage_path) / job / f".fault_injected_at_{step}"


def non_finite_marker(storage_path: str, job: str) -> Path:
    """Written when a worker's loss became non-finite: Ray Train's retry of the same deterministic
    steps would meet it again, so the retried workers stop at once (the driver clears it first)."""
    return Path(storage_path) / job / ".non_finite_loss.json"


def _inject_fault(storage_path: str, job: str, step: int) -> None:
    """Test hook: raise once at ``step``; a marker on shared storage keeps the retry from raising."""
    marker = fault_marker(storage_path, job, step)
    if not marker.exists():
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
        raise RuntimeError(f"injected worker failure at step {step} (train.fault_at_step)")


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
        if self.rank0 and config.get("run_id"):
            from rayrcm.orchestration.tracking import MetricLogger

            self.logger = MetricLogger(config["tracking_uri"], config["run_id"], s.cfg.tracking.system_metrics)
        self.progress = Progress(s.cfg.job_name, s.cfg.train.steps, s.start, s.cfg.train.progress_every_s, self.say)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if self.logger is not None:
            self.logger.log(step, metrics)

    def started(self, config: dict[str, Any]) -> None:
        """Rank 0, at the first step it trains: the job's run is RUNNING (again)."""
        if self.logger is not None and not self._running:
            from rayrcm.orchestration.tracking import mark_running

            mark_running(config["tracking_uri"], config["run_id"])
        self._running = True

    def say(self, line: str) -> None:
        if self.rank0:
            say(line)

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        if self.rank0:
            self.progress(step, metrics)
            self.log(step, metrics)

    def close(self) -> None:
        if self.logger is not None:
            self.logger.close()


def _resume(s: Session) -> None:
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            restore(s, load_state(d))


def _report(s: Session, step: int, metrics: dict[str, float], final: bool = False) -> None:
    """Every worker reports (a barrier); rank 0 attaches the checkpoint (with ``model.pt`` at the end)."""
    import ray.train

    with tempfile.TemporaryDirectory() as d:
        checkpoint = None
        if s.rank == 0:
            save(s, d, step, final=final)
            checkpoint = ray.train.Checkpoint.from_directory(d)
        ray.train.report({"step": step, **metrics}, checkpoint=checkpoint)


def train_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    load_plugins(config["cfg"]["train"].get("plugins", ()))
    cfg = from_dict(config["cfg"])
    t, ctx = cfg.train, ray.train.get_context()
    s = build_session(cfg, config["cfg"], device=ray.train.torch.get_device(), rank=ctx.get_world_rank(),
                      world=ctx.get_world_size())
    _resume(s)
    s.objective.to(s.device)
    model = ray.train.torch.prepare_model(s.objective) if s.world > 1 else s.objective
    out = _Rank0(config, s)
    out.say(f"[rayrcm] {cfg.job_name}: {'resuming at' if s.start else 'starting'} step {s.start}/{t.steps}, "
            f"{s.world} worker(s), {len(s.train_set)} training images")
    validator = Validator(s, out.log, out.say)

    def checkpoint(step: int, metrics: dict[str, float]) -> None:
        _report(s, step, {**metrics, **validator(step)})

    def before(step: int) -> None:
        out.started(config)
        if step == t.fault_at_step and s.rank == 0:
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
    if tested or final:  # validation metrics were logged by the validator
        out.log(t.steps, {k: v for k, v in {**final, **tested}.items() if not k.startswith("val_")})
    _report(s, t.steps, {**metrics, **final, **tested}, final=True)
    out.close()
