"""One skeleton for the results jobs: certification (:mod:`rayrcm.orchestration.certify_job`) and the
evaluation suite (:mod:`rayrcm.orchestration.evaluate_job`). A job says what differs (a
:class:`ResultsJob`: its actor pool, its MLflow params, its progress, its rows of work, its outputs);
this module runs it:

1. under the results folder's lock (:func:`~rayrcm.orchestration.job_files.folder_lock`), prepared
   again when another job finished work since it was prepared;
2. before any MLflow run is opened, when there is work: Ray started or joined, and a cluster that
   cannot hold the pool refused in one line (:meth:`Pool.require`);
3. the protocol written next to the rows and the job's MLflow run found or created
   (:func:`~rayrcm.orchestration.tracking.start_results_run`; an existing run keeps its status
   until there is work to do, then it is RUNNING again);
4. the rows of work streamed through a pool of actors (:func:`stream`); finished rows are buffered
   into Parquet parts (:class:`Progress`, :mod:`rayrcm.result_parts`), kept when the job fails so
   that its rerun resumes;
5. any failure after the run was opened ends it FAILED; the outputs logged and the run finished by
   the job's ``finish`` (:func:`log_results`).
"""

from __future__ import annotations

import json
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import pandas as pd

from rayrcm.orchestration import cluster, job_files, lineage, live, tracking
from rayrcm.result_parts import PROTOCOL_FILE, ROWS_DIR, RUN_FILE, write_part


class PreparedJob(Protocol):
    """What the skeleton reads of a job's ``Prepared`` (its config, folder and MLflow run's home)."""

    uri: str | None
    name: str
    out: Path

    @property
    def todo(self) -> Sized: ...  # the work still to do (images, shards)


P = TypeVar("P", bound=PreparedJob)
R = TypeVar("R")


@dataclass(frozen=True)
class Pool:
    """A job's actor pool and the config keys named when the cluster cannot hold it."""

    workers: int
    use_gpu: bool
    gpus_per_worker: float
    cpus_per_worker: float
    gpu_key: str  # the key of use_gpu, named when the cluster lacks the GPUs
    cpu_key: str = ""  # the key of cpus_per_worker, named when it lacks the CPUs ("": not asked)

    def require(self) -> None:
        """Fail in one line when the Ray cluster cannot hold the pool (instead of waiting forever)."""
        cluster.require_gpus(self.gpu_key, self.workers * self.gpus_per_worker if self.use_gpu else 0)
        if self.cpu_key:
            cluster.require_cpus(self.cpu_key, self.cpus_per_worker, self.cpus_per_worker, self.workers)


class Progress:
    """Buffers finished rows into Parquet parts; prints (and logs) progress every few seconds, or
    draws a live bar in a terminal (:mod:`rayrcm.orchestration.live`). A job says what its line
    reads (:meth:`line`, :meth:`state`, :meth:`metrics`) and what its rate counts (:meth:`work`)."""

    waiting = "starting"  # the time left, before anything finished

    def __init__(self, out: Path, total: int, before: int, *, label: str, unit: str, flush_every: int,
                 every_s: float, logger: Any) -> None:
        self.out, self.logger, self.flush_every, self.every_s = out, logger, flush_every, every_s
        self.total, self.before = total, before
        self.done_count = before
        self.buffer: list[dict[str, Any]] = []  # finished rows not written yet
        self.tic = self.last = time.perf_counter()
        self.bar = live.bar(total, label, unit, initial=before) if live.interactive() else None

    def flush(self) -> None:
        write_part(self.out / ROWS_DIR, self.buffer)
        self.buffer = []

    def done(self, records: list[dict[str, Any]]) -> None:
        self.buffer += records
        self.done_count += len(records)
        if len(self.buffer) >= self.flush_every:
            self.flush()

    def work(self) -> int:
        """What the rate counts (draws, images) so far."""
        return 0

    def partial(self) -> float:
        """The rows begun and not finished, as a fraction of a row (the bar moves within one)."""
        return 0.0

    def state(self, rate: float) -> str:
        return f"{rate:,.0f}/s"

    def line(self, rate: float, elapsed: float, left: str, part: float) -> str:
        return f"[rayrcm] {self.done_count}/{self.total} done, {elapsed:.0f} s elapsed, {left}"

    def metrics(self, rate: float) -> dict[str, float]:
        return {}

    def tick(self, final: bool = False) -> None:
        now = time.perf_counter()
        rate = self.work() / max(now - self.tic, 1e-9)
        part = 0.0 if final else self.partial()
        if self.bar is not None:
            live.advance(self.bar, round(self.done_count + part, 1) if part else self.done_count, self.state(rate), final)
        if not final and now - self.last < self.every_s:
            return
        self.flush()
        self.last = now
        new = self.done_count - self.before + part
        left = f"~{(now - self.tic) / new * (self.total - self.done_count - part):.0f} s left" if new else self.waiting
        if self.bar is None:
            print(self.line(rate, now - self.tic, left, part), flush=True)
        if self.logger:
            # progress, not results: kept under progress/ so they never read as a result metric
            self.logger.log(self.done_count, self.metrics(rate))


class ResultsJob(ABC, Generic[P, R]):
    """What one kind of results job does its own way; :func:`run` is the rest."""

    def warnings(self, p: P) -> list[str]:
        """Said on stderr before anything starts."""
        return []

    @abstractmethod
    def stale(self, p: P) -> bool:
        """Whether another job finished work in the folder since ``p`` was prepared."""

    @abstractmethod
    def pool(self, p: P) -> Pool: ...

    @abstractmethod
    def run_params(self, p: P) -> tuple[str, dict[str, Any], dict[str, str]]:
        """The MLflow run's ``(stage, params, tags)`` beyond the protocol's."""

    @abstractmethod
    def progress(self, p: P, logger: Any) -> Progress: ...

    @abstractmethod
    def announce(self, p: P, progress: Progress) -> None:
        """The job's first lines (what it computes, what is already done, where the results go)."""

    @abstractmethod
    def compute(self, p: P, progress: Progress) -> None:
        """The missing work through the actor pool (:func:`stream`), finished rows handed to ``progress``."""

    @abstractmethod
    def finish(self, p: P, run_id: str | None, logger: Any, progress: Progress, show_table: bool) -> R:
        """Read every row, write the outputs, log them (:func:`log_results`) and say so."""


def run(job: ResultsJob[P, R], prepare: Callable[[], P], *, ray_init: dict[str, Any] | None = None,
        prepared: P | None = None, show_table: bool = True) -> R:
    """Run ``job``; resumes when the same job ran before. One job at a time writes a results folder."""
    p = prepared or prepare()
    with job_files.folder_lock(p.out, p.name):
        if job.stale(p):  # another job finished work since we looked
            p = prepare()
        return _run_locked(job, p, ray_init, show_table)


def _run_locked(job: ResultsJob[P, R], p: P, ray_init: dict[str, Any] | None, show_table: bool) -> R:
    for w in job.warnings(p):
        print(f"[rayrcm] {w}", file=sys.stderr, flush=True)
    if p.todo:  # can the cluster hold the job? asked before any run is opened
        cluster.ensure_ray(**(ray_init or {}))
        job.pool(p).require()
    run_id = open_run(job, p)
    ok = False
    try:
        result = _run(job, p, run_id, ray_init, show_table)
        ok = True
    finally:
        if not ok and p.uri and run_id:
            tracking.fail_if_running(p.uri, run_id)
    return result


def open_run(job: ResultsJob[P, Any], p: P) -> str | None:
    """Write the protocol next to the rows; find or create the job's MLflow run (an existing run
    keeps its status until there is work to do)."""
    stage, params, tags = job.run_params(p)
    return tracking.start_results_run(p, PROTOCOL_FILE, stage, params, tags)


def _run(job: ResultsJob[P, R], p: P, run_id: str | None, ray_init: dict[str, Any] | None, show_table: bool) -> R:
    logger = None
    if run_id and p.uri:  # a run id comes with the tracking URI it was opened at
        (p.out / RUN_FILE).write_text(json.dumps({"tracking_uri": p.uri, "run_id": run_id}))
        logger = tracking.MetricLogger(p.uri, run_id)
    progress = job.progress(p, logger)
    job.announce(p, progress)
    if p.todo:
        cluster.ensure_ray(**(ray_init or {}))
        if run_id and p.uri:
            tracking.mark_running(p.uri, run_id)
        try:
            job.compute(p, progress)
        except BaseException:
            try:  # keep the work finished so far for the rerun; the first error is the news
                progress.flush()
            except Exception:  # noqa: BLE001
                pass
            raise
    return job.finish(p, run_id, logger, progress, show_table)


def stream(items: list[dict[str, Any]], actor: type, *, refs: dict[str, Any], kwargs: dict[str, Any], pool: Pool,
           per_call: int, add: Callable[[dict[str, Any]], None], progress: Progress) -> None:
    """Stream ``items`` (rows of work) through a pool of ``actor``s, ``per_call`` rows per call; each
    actor is built with ``kwargs`` and ``refs`` (put in Ray's object store once; None stays None).
    Every batch of results goes to ``add``, then the progress ticks."""
    import ray
    from ray.data import ActorPoolStrategy

    from rayrcm.orchestration import console

    console.quiet_data()
    put = {k: None if v is None else ray.put(v) for k, v in refs.items()}
    ds: ray.data.Dataset = ray.data.from_items(items, override_num_blocks=-(-len(items) // per_call))
    ds = ds.map_batches(
        actor,
        fn_constructor_kwargs={**put, **kwargs},
        batch_size=per_call,
        compute=ActorPoolStrategy(size=pool.workers),
        num_gpus=pool.gpus_per_worker if pool.use_gpu else 0,
        num_cpus=pool.cpus_per_worker,
    )
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1):
        add(batch)
        progress.tick()
    progress.tick(final=True)


def check_once(out: Path, rows: pd.DataFrame, column: str, what: str) -> None:
    """Refuse a folder where a row (an image, a shard) was written twice."""
    dup = rows[column].duplicated()
    if dup.any():
        raise RuntimeError(f"{out}: {what} was written twice: {rows[column][dup].tolist()[:5]}")


def log_results(p: PreparedJob, run_id: str | None, logger: Any, step: int, metrics: dict[str, float],
                files: list[Path]) -> None:
    """Log the job's metrics at ``step``, its output ``files`` and its rows to its MLflow run, and finish it."""
    if logger and p.uri and run_id:  # a logger is made for a run (at p.uri)
        logger.log(step, metrics)
        for f in files:
            logger.log_artifact(f)
        logger.log_folder(p.out / ROWS_DIR, ROWS_DIR)
        lineage.finish_run(p.uri, run_id)


def done_line(what: str, out: Path, computed: int, unit: str, wall: float) -> str:
    """``[rayrcm] <what> in <out>, <computed> <unit> computed in <wall> s`` (or nothing left to compute)."""
    return (f"[rayrcm] {what} in {out}"
            + (f", {computed}{unit} computed in {wall:.1f} s" if computed else ", nothing left to compute"))
