"""Certification as a Ray Data job: rows of Monte Carlo work, counting actors, resumable Parquet.

Work is split into rows ``(image, role, chunk)`` (see :mod:`rayrcm.certify.smoothing`); a pool of
:class:`~rayrcm.orchestration.certify_actor.CountActor` (one per GPU, or CPU workers) loads the
model once and returns per-class counts per row. The driver sums the rows of each image; when
the last one arrives it computes the certificate from the totals.

Ordering of the counts: see :mod:`rayrcm.certify.collect` (the pure half of this job: actor
settings, per-image sums, Parquet parts). Preparation (everything that can fail on bad input) is
:mod:`rayrcm.orchestration.certify_prepare`; ``rayrcm analyze`` is :mod:`rayrcm.orchestration.analyze`.

Resume: finished images are appended to ``<out_dir>/<name>/rows/part-*.parquet`` (written to a
temporary file and renamed, so a part is whole or absent). A rerun of the same job reads them,
skips those images and never writes one twice; a rerun with another protocol is refused (the
image size, recorded since it joined the protocol, compares as equal when an older job's
``protocol.json`` lacks it).
Rows that were in flight when a job died are simply recomputed: their noise is seeded, so the
counts are the same. Ray Data restarts a killed actor and retries its rows.

MLflow: any failure after the job's run is opened ends it FAILED; a rerun reopens an existing run
(RUNNING) only when it has images to compute, so a rerun that fails before that leaves a finished
run as it was. A ``--gpu`` job on a cluster without GPUs fails with one line instead of waiting.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from rayrcm.analysis import (
    read_results,
    summary_metrics,
    summary_table,
    to_markdown,
    write_analysis,
    write_cohen_tsv,
)
from rayrcm.analysis.per_class import per_class_metrics
from rayrcm.analysis.report import table_radii
from rayrcm.analysis.results import ROWS_DIR, TSV_NAME, read_rows_dir
from rayrcm.certify.collect import Collector, CountSettings, write_part
from rayrcm.certify.protocol import CertifyConfig, sequential_radii
from rayrcm.certify.stats import max_certifiable_radius
from rayrcm.orchestration import job_files, lineage, live, tracking
from rayrcm.orchestration.analyze import analyze
from rayrcm.orchestration.certify_prepare import (
    PROTOCOL_FILE,
    RUN_FILE,
    Prepared,
    prepare,
    sigma_warnings,
)
from rayrcm.overrides import parse_dotted, to_flat_dict, update_dataclass

__all__ = [  # what callers import from here (the CLI, quickstart, experiments, benchmarks, tests)
    "PROTOCOL_FILE", "RUN_FILE", "CertifyResult", "Prepared", "analyze", "config_from_args", "max_radius", "prepare", "read_results",
    "run", "write_analysis",
]


@dataclass
class CertifyResult:
    name: str
    out: Path
    run_id: str | None
    rows: pd.DataFrame
    table: pd.DataFrame
    metrics: dict[str, float]
    computed: int  # images certified by this invocation (the rest were already done)


def _count_all(p: Prepared, collector: Collector, progress: _Progress) -> None:
    """Stream the rows through the actor pool; hand finished images to ``progress``."""
    import ray
    from ray.data import ActorPoolStrategy

    from rayrcm.orchestration import console
    from rayrcm.orchestration.certify_actor import CountActor

    console.quiet_data()
    c = p.cfg.compute
    model_ref = ray.put(p.model_file.read_bytes())
    images_ref = ray.put(p.images)
    denoiser_ref = ray.put(p.denoiser_file.read_bytes()) if p.denoiser_file else None
    # sequential rows: an actor certifies a batch of images side by side (one block of rows per batch), at most
    # compute.sequential_images, and small enough that every actor gets about four batches (no idle actor at the end)
    per_call = 1
    if p.cfg.smoothing.sampling == "sequential":
        per_call = max(1, min(c.sequential_images, -(-len(collector.rows) // (4 * c.workers))))
    ds: ray.data.Dataset = ray.data.from_items(collector.rows, override_num_blocks=-(-len(collector.rows) // per_call))
    ds = ds.map_batches(
        CountActor,
        fn_constructor_kwargs={"model_ref": model_ref, "images_ref": images_ref,
                               "settings": CountSettings.from_config(p.cfg), "denoiser_ref": denoiser_ref},
        batch_size=per_call,
        compute=ActorPoolStrategy(size=c.workers),
        num_gpus=c.gpus_per_worker if c.use_gpu else 0,
        num_cpus=c.cpus_per_worker,
    )
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1):
        progress.done(collector.add(batch))
        progress.tick()
    progress.tick(final=True)


class _Progress:
    """Buffers finished images into Parquet parts; prints (and logs) progress every few seconds,
    or draws a live bar in a terminal (:mod:`rayrcm.orchestration.live`)."""

    def __init__(self, p: Prepared, collector: Collector, logger: Any) -> None:
        self.p, self.collector, self.logger = p, collector, logger
        self.total, self.before = len(p.indices), len(p.indices) - len(collector.todo)
        self.done_count = self.before
        self.buffer: list[dict[str, Any]] = []  # finished images' records not written yet
        self.tic = self.last = time.perf_counter()
        self.bar = live.bar(self.total, f"{p.cfg.mode} {p.name}", "img", initial=self.before) if live.interactive() else None

    def flush(self) -> None:
        write_part(self.p.out / ROWS_DIR, self.buffer)
        self.buffer = []

    def done(self, records: list[dict[str, Any]]) -> None:
        self.buffer += records
        self.done_count += len(records)
        if len(self.buffer) >= self.p.cfg.compute.flush_every:
            self.flush()

    def tick(self, final: bool = False) -> None:
        now, mode = time.perf_counter(), self.p.cfg.mode
        rate = self.collector.samples / max(now - self.tic, 1e-9)
        # within an image too: the finished rows of the images begun (a row is `chunk` draws)
        part = 0.0 if final else self.collector.partial()
        if self.bar is not None:
            state = f"{rate:,.0f} samples/s" if self.collector.samples else f"starting {self.p.cfg.compute.workers} actor(s)"
            live.advance(self.bar, round(self.done_count + part, 1) if part else self.done_count, state, final)
        if not final and now - self.last < self.p.cfg.compute.progress_every_s:
            return
        self.flush()
        self.last = now
        new = self.done_count - self.before + part
        left = (f"~{(now - self.tic) / new * (self.total - self.done_count - part):.0f} s left" if new
                else "starting the counting actors")
        if self.bar is None:
            begun = f" (+{part:.1f} begun)" if part else ""
            print(f"[rayrcm] {mode}: {self.done_count}/{self.total} images{begun}, {self.collector.samples:,} draws, "
                  f"{rate:,.0f} samples/s, {now - self.tic:.0f} s elapsed, {left}", flush=True)
        if self.logger:
            # progress, not results: kept under progress/ so they never read as a certification metric
            self.logger.log(self.done_count, {"progress/images_done": self.done_count, "progress/samples_per_s": rate})


def _start(p: Prepared) -> str | None:
    """Write the protocol next to the rows; find or create the job's MLflow run (an existing run
    keeps its status until there is work to do)."""
    cfg = p.cfg
    params: dict[str, Any] = {f"compute.{k}": v for k, v in to_flat_dict(cfg.compute).items()}
    reach = max_radius(cfg)
    if reach is not None:
        params["max_certifiable_radius"] = f"{reach:.6f}"
    if cfg.plugins:
        params["plugins"] = ",".join(cfg.plugins)  # not in the protocol: they do not change results
    tags = {"rayrcm.sigma_mismatch": "true"} if sigma_warnings(cfg, p.meta) else {}
    return tracking.start_results_run(p, PROTOCOL_FILE, cfg.mode, params, tags)


def run(cfg: CertifyConfig, *, ray_init: dict[str, Any] | None = None, prepared: Prepared | None = None,
        show_table: bool = True) -> CertifyResult:
    """Certify (or predict) the job's images; resumes when the same job ran before. One job at a time
    writes a results folder (:func:`~rayrcm.orchestration.job_files.folder_lock`)."""
    p = prepared or prepare(cfg)
    with job_files.folder_lock(p.out, p.name):
        if len(read_rows_dir(p.out)) > len(p.finished):  # another job finished images since we looked
            p = prepare(cfg)
        return _run_locked(p, ray_init, show_table)


def _run_locked(p: Prepared, ray_init: dict[str, Any] | None, show_table: bool) -> CertifyResult:
    for w in p.warnings:
        print(f"[rayrcm] {w}", file=sys.stderr, flush=True)
    if p.todo:  # can the cluster hold the job? asked before any run is opened
        from rayrcm.orchestration.cluster import ensure_ray, require_cpus, require_gpus

        c = p.cfg.compute
        ensure_ray(**(ray_init or {}))
        require_gpus("compute.use_gpu", c.workers * c.gpus_per_worker if c.use_gpu else 0)
        require_cpus("compute.cpus_per_worker", c.cpus_per_worker, c.cpus_per_worker, c.workers)
    run_id = _start(p)
    ok = False
    try:
        result = _run(p, run_id, ray_init, show_table)
        ok = True
    finally:
        if not ok and p.uri and run_id:
            tracking.fail_if_running(p.uri, run_id)
    return result


def _run(p: Prepared, run_id: str | None, ray_init: dict[str, Any] | None, show_table: bool) -> CertifyResult:
    from rayrcm.orchestration.cluster import ensure_ray

    cfg, s = p.cfg, p.cfg.smoothing
    logger = None
    if run_id and p.uri:  # a run id comes with the tracking URI it was opened at
        (p.out / RUN_FILE).write_text(json.dumps({"tracking_uri": p.uri, "run_id": run_id}))
        logger = tracking.MetricLogger(p.uri, run_id)
    collector = Collector(cfg, p.todo, p.labels, int(p.meta["num_classes"]))
    progress = _Progress(p, collector, logger)
    sampling = (f", input-specific sample sizes up to n (radius decline <= {s.max_decline:g}"
                f"{' of the radius' if s.decline == 'relative' else ''})" if s.sampling == "iss" else "")
    draws = f"n0={s.n0}, n={s.n}"
    if s.sampling == "sequential":
        draws = (f"sequential: radii {', '.join(f'{r:g}' for r in sequential_radii(s))} decided per image, "
                 f"at most n={s.n} draws" + (f", radius tolerance {s.tolerance:g}" if s.tolerance else ""))
    print(f"[rayrcm] {cfg.mode}: {p.name}: {progress.total} images ({progress.before} already done), sigma={s.sigma:g}, "
          f"{draws}, alpha={s.alpha:g}{sampling}; results in {p.out}", flush=True)
    if collector.rows:
        ensure_ray(**(ray_init or {}))
        if run_id and p.uri:
            tracking.mark_running(p.uri, run_id)
        try:
            _count_all(p, collector, progress)
        except BaseException:
            try:  # keep the images finished so far for the rerun; the first error is the news
                progress.flush()
            except Exception:  # noqa: BLE001
                pass
            raise
    todo = progress.total - progress.before
    return _finish(p, run_id, logger, collector, time.perf_counter() - progress.tic, todo, show_table)


def _finish(p: Prepared, run_id: str | None, logger: Any, collector: Collector, wall: float, computed: int,
            show_table: bool) -> CertifyResult:
    rows = read_results(p.out)
    if rows["idx"].duplicated().any():
        raise RuntimeError(f"{p.out}: an image was written twice: {rows['idx'][rows['idx'].duplicated()].tolist()[:5]}")
    write_cohen_tsv(rows, p.out / TSV_NAME, p.cfg.mode)
    reach = max_radius(p.cfg)
    grid = list(sequential_radii(p.cfg.smoothing)) if p.cfg.smoothing.sampling == "sequential" else None
    table = summary_table({p.name: rows}, grid, max_radii={p.name: reach})
    metrics = {**summary_metrics(rows, grid, max_radius=reach),
               **per_class_metrics(rows, table_radii(table), reach if p.cfg.mode == "certify" else None)}
    progress = {"progress/wall_seconds": wall, "progress/samples_per_s": collector.samples / max(wall, 1e-9)}
    files = write_analysis({p.name: rows}, p.out, title=f"{p.cfg.mode} sigma={p.cfg.smoothing.sigma:g}",
                           radii=grid, max_radii={p.name: reach})
    if logger and p.uri and run_id:  # a logger is made for a run (at p.uri)
        logger.log(len(rows), {**metrics, **(progress if computed else {})})
        for f in [p.out / TSV_NAME, p.out / PROTOCOL_FILE, *files]:
            logger.log_artifact(f)
        logger.log_folder(p.out / ROWS_DIR, ROWS_DIR)
        lineage.finish_run(p.uri, run_id)
    print(f"[rayrcm] {p.cfg.mode} done: {len(rows)} images in {p.out}"
          + (f", {computed} computed in {wall:.1f} s" if computed else ", nothing left to compute"), flush=True)
    if show_table:
        print(to_markdown(table), flush=True)
        if reach is not None:
            print(reach_note(p.cfg, reach), flush=True)
    return CertifyResult(p.name, p.out, run_id, rows, table, metrics, computed)


def max_radius(cfg: CertifyConfig) -> float | None:
    """The largest radius this protocol can certify (``certify`` only; ``predict`` has no radius)."""
    if cfg.mode != "certify":
        return None
    s = cfg.smoothing
    if s.sampling == "sequential":  # decided at its radii only: nothing is measured beyond the largest
        return max(sequential_radii(s))
    return max_certifiable_radius(s.n, s.alpha, s.sigma)


def reach_note(cfg: CertifyConfig, reach: float) -> str:
    """One line saying where the table stops and why."""
    s = cfg.smoothing
    if s.sampling == "sequential":
        return (f"[rayrcm] sequential: each image was decided at radii {', '.join(f'{r:g}' for r in sequential_radii(s))} "
                f"(a radius undecided at n={s.n} draws counts as not certified); ACR is not defined for this protocol")
    return (f"[rayrcm] with n={s.n}, alpha={s.alpha:g} no radius can exceed sigma * Phi^-1(alpha^(1/n)) = {reach:.3f} "
            f"(sigma={s.sigma:g}): radii beyond it are not reported")


def config_from_args(overrides: list[str], base: CertifyConfig | None = None) -> CertifyConfig:
    return update_dataclass(base or CertifyConfig(), parse_dotted(overrides))
