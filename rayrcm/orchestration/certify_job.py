"""Certification as a Ray Data job: rows of Monte Carlo work, counting actors, resumable Parquet.

Work is split into rows ``(image, role, chunk)`` (see :mod:`rayrcm.certify.smoothing`); a pool of
:class:`~rayrcm.orchestration.certify_actor.CountActor` (one per GPU, or CPU workers) loads the
model once and returns per-class counts per row. The driver sums the rows of each image; when
the last one arrives it computes the certificate from the totals.

Ordering of the counts: see :mod:`rayrcm.certify.collect` (the pure half of this job: actor
settings, per-image sums); the rows of an image and what is certified from them are the sampling
mode's (:mod:`rayrcm.certify.sampling`). Preparation (everything that can fail on bad input) is
:mod:`rayrcm.orchestration.certify_prepare`; ``rayrcm analyze`` is :mod:`rayrcm.orchestration.analyze`;
the skeleton shared with ``rayrcm evaluate`` (lock, cluster checks, MLflow run, actor pool, resume)
is :mod:`rayrcm.orchestration.results_job`.

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
from rayrcm.analysis.results import COHEN_CERTIFY, TSV_NAME
from rayrcm.certify.collect import Collector, CountSettings
from rayrcm.certify.protocol import CertifyConfig
from rayrcm.certify.sampling import sampling_mode
from rayrcm.orchestration import results_job
from rayrcm.orchestration.analyze import analyze
from rayrcm.orchestration.certify_prepare import (
    PROTOCOL_FILE,
    RUN_FILE,
    Prepared,
    prepare,
    sigma_warnings,
)
from rayrcm.orchestration.results_job import Pool, check_once, done_line, log_results
from rayrcm.overrides import parse_dotted, to_flat_dict, update_dataclass
from rayrcm.result_parts import read_parts

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


class _Progress(results_job.Progress):
    """Finished images into Parquet parts; the rate counts draws, and the bar moves within an image."""

    waiting = "starting the counting actors"

    def __init__(self, p: Prepared, collector: Collector, logger: Any) -> None:
        c = p.cfg.compute
        super().__init__(p.out, len(p.indices), len(p.indices) - len(collector.todo), label=f"{p.cfg.mode} {p.name}",
                         unit="img", flush_every=c.flush_every, every_s=c.progress_every_s, logger=logger)
        self.mode, self.workers, self.collector = p.cfg.mode, c.workers, collector

    def work(self) -> int:
        return self.collector.samples

    def partial(self) -> float:  # within an image too: the finished rows of the images begun (a row is `chunk` draws)
        return self.collector.partial()

    def state(self, rate: float) -> str:
        return f"{rate:,.0f} samples/s" if self.collector.samples else f"starting {self.workers} actor(s)"

    def line(self, rate: float, elapsed: float, left: str, part: float) -> str:
        begun = f" (+{part:.1f} begun)" if part else ""
        return (f"[rayrcm] {self.mode}: {self.done_count}/{self.total} images{begun}, {self.collector.samples:,} draws, "
                f"{rate:,.0f} samples/s, {elapsed:.0f} s elapsed, {left}")

    def metrics(self, rate: float) -> dict[str, float]:
        return {"progress/images_done": self.done_count, "progress/samples_per_s": rate}


class CertifyJob(results_job.ResultsJob[Prepared, CertifyResult]):
    """``rayrcm certify`` / ``predict`` on the results-job skeleton (:mod:`rayrcm.orchestration.results_job`)."""

    def warnings(self, p: Prepared) -> list[str]:
        return p.warnings

    def stale(self, p: Prepared) -> bool:
        return len(read_parts(p.out, COHEN_CERTIFY)) > len(p.finished)

    def pool(self, p: Prepared) -> Pool:
        c = p.cfg.compute
        return Pool(c.workers, c.use_gpu, c.gpus_per_worker, c.cpus_per_worker, "compute.use_gpu", "compute.cpus_per_worker")

    def run_params(self, p: Prepared) -> tuple[str, dict[str, Any], dict[str, str]]:
        cfg = p.cfg
        params: dict[str, Any] = {f"compute.{k}": v for k, v in to_flat_dict(cfg.compute).items()}
        reach = max_radius(cfg)
        if reach is not None:
            params["max_certifiable_radius"] = f"{reach:.6f}"
        if cfg.plugins:
            params["plugins"] = ",".join(cfg.plugins)  # not in the protocol: they do not change results
        tags = {"rayrcm.sigma_mismatch": "true"} if sigma_warnings(cfg, p.meta) else {}
        return cfg.mode, params, tags

    def progress(self, p: Prepared, logger: Any) -> _Progress:
        return _Progress(p, Collector(p.cfg, p.todo, p.labels, int(p.meta["num_classes"])), logger)

    def announce(self, p: Prepared, progress: results_job.Progress) -> None:
        cfg, s = p.cfg, p.cfg.smoothing
        mode = sampling_mode(s.sampling)
        print(f"[rayrcm] {cfg.mode}: {p.name}: {progress.total} images ({progress.before} already done), sigma={s.sigma:g}, "
              f"{mode.draws(s)}, alpha={s.alpha:g}{mode.note(s)}; results in {p.out}", flush=True)

    def compute(self, p: Prepared, progress: results_job.Progress) -> None:
        from rayrcm.orchestration.certify_actor import CountActor

        assert isinstance(progress, _Progress)
        collector = progress.collector
        per_call = sampling_mode(p.cfg.smoothing.sampling).images_per_call(p.cfg, len(collector.rows))
        refs = {"model_ref": p.model_file.read_bytes(), "images_ref": p.images,
                "denoiser_ref": p.denoiser_file.read_bytes() if p.denoiser_file else None}
        results_job.stream(collector.rows, CountActor, refs=refs, kwargs={"settings": CountSettings.from_config(p.cfg)},
                           pool=self.pool(p), per_call=per_call, add=lambda batch: progress.done(collector.add(batch)),
                           progress=progress)

    def finish(self, p: Prepared, run_id: str | None, logger: Any, progress: results_job.Progress,
               show_table: bool) -> CertifyResult:
        assert isinstance(progress, _Progress)
        wall, computed = time.perf_counter() - progress.tic, progress.total - progress.before
        rows = read_results(p.out)
        check_once(p.out, rows, "idx", "an image")
        write_cohen_tsv(rows, p.out / TSV_NAME, p.cfg.mode)
        reach = max_radius(p.cfg)
        radii = sampling_mode(p.cfg.smoothing.sampling).grid(p.cfg.smoothing)
        grid = list(radii) if radii is not None else None
        table = summary_table({p.name: rows}, grid, max_radii={p.name: reach})
        metrics = {**summary_metrics(rows, grid, max_radius=reach),
                   **per_class_metrics(rows, table_radii(table), reach if p.cfg.mode == "certify" else None)}
        speed = {"progress/wall_seconds": wall, "progress/samples_per_s": progress.collector.samples / max(wall, 1e-9)}
        files = write_analysis({p.name: rows}, p.out, title=f"{p.cfg.mode} sigma={p.cfg.smoothing.sigma:g}",
                               radii=grid, max_radii={p.name: reach})
        log_results(p, run_id, logger, len(rows), {**metrics, **(speed if computed else {})},
                    [p.out / TSV_NAME, p.out / PROTOCOL_FILE, *files])
        print(done_line(f"{p.cfg.mode} done: {len(rows)} images", p.out, computed, "", wall), flush=True)
        if show_table:
            print(to_markdown(table), flush=True)
            if reach is not None:
                print(reach_note(p.cfg, reach), flush=True)
        return CertifyResult(p.name, p.out, run_id, rows, table, metrics, computed)


JOB = CertifyJob()


def run(cfg: CertifyConfig, *, ray_init: dict[str, Any] | None = None, prepared: Prepared | None = None,
        show_table: bool = True) -> CertifyResult:
    """Certify (or predict) the job's images; resumes when the same job ran before. One job at a time
    writes a results folder (:func:`~rayrcm.orchestration.job_files.folder_lock`)."""
    return results_job.run(JOB, lambda: prepare(cfg), ray_init=ray_init, prepared=prepared, show_table=show_table)


def _start(p: Prepared) -> str | None:
    """Write the protocol next to the rows; find or create the job's MLflow run."""
    return results_job.open_run(JOB, p)


def max_radius(cfg: CertifyConfig) -> float | None:
    """The largest radius this protocol can certify (``certify`` only; ``predict`` has no radius)."""
    if cfg.mode != "certify":
        return None
    return sampling_mode(cfg.smoothing.sampling).reach(cfg.smoothing)


def reach_note(cfg: CertifyConfig, reach: float) -> str:
    """One line saying where the table stops and why."""
    return sampling_mode(cfg.smoothing.sampling).reach_note(cfg.smoothing, reach)


def config_from_args(overrides: list[str], base: CertifyConfig | None = None) -> CertifyConfig:
    return update_dataclass(base or CertifyConfig(), parse_dotted(overrides))
