"""The robustness evaluation suite as one Ray Data job: clean accuracy, common corruptions
(generated or released), PGD and AutoAttack, sharded over actors, resumable, with one result schema.

    rayrcm evaluate --model REF --suite clean,corruptions,pgd,aa --severities 1,3,5

**Result schema** (one row per evaluated cell; ``results.parquet`` / ``results.csv`` of the job
folder, :data:`RESULT_COLUMNS`; every evaluation's, certification included: ``rayrcm compare``,
:mod:`rayrcm.analysis.compare`):

========== ==========================================================================================
model      the model reference as given (``models:/...``, a run id, a path)
set        the image set: the clean split's dataset (``digits``, ``cifar10``), a generated corruption
           set (``<dataset>-c-generated``), a released one (``cifar10-c``, ``cifar100-c``), or a shifted
           set (``cifar10.1``, ``imagenet-sketch``, ``imagenet-r``, ``stylized-imagenet``, released
           ``imagenet-c``; its own images, ``skip``/``max_images`` applied to them too)
corruption ``none`` for a clean set, else the corruption's name (``contrast``, ...)
severity   0 for a clean set, else 1-5
generated  True for corruptions generated here (new random draws with CIFAR-10-C's parameters, keyed by
           ``(seed, image index, corruption, severity)``; not comparable with published CIFAR-10-C numbers)
attack     ``none``, ``pgd<k>`` (L-inf PGD-k, random start), ``aa`` (the standard AutoAttack: APGD-CE,
           APGD-T, FAB-T, Square; "AutoAttack (standard)" in the tables) or ``aa-apgd`` (APGD-CE then
           APGD-T only: "APGD-CE+APGD-T (upper bound)", faster; :mod:`rayrcm.attacks.autoattack`); in a
           certification's cells (read by ``rayrcm compare``), ``rs-sigma<s>``
radius     0 here; a certification's cell: the L2 radius its certified accuracy is read at
images     images evaluated
correct    images classified right (and, under an attack, not broken by it)
accuracy   correct / images
========== ==========================================================================================

**Sharding.** The job's image list (the split's indices, ``skip`` and ``max_images`` applied) is cut
into fixed shards of ``shard_size`` consecutive positions; a row of work is one
``(set, corruption, severity, attack, shard)``, keyed ``set|corruption|severity|attack|shard``. A
pool of :class:`~rayrcm.orchestration.evaluate_actor.EvalActor` (one per GPU, or CPU workers) loads
the model and the clean images once; generated corruptions are made inside the actor from the clean
images under the corruption key, released CIFAR-C images are read by the actor from ``c_path``
(memory-mapped: a path every node sees). Shards, batches and seeds do not depend on the worker
count, so 1 and N actors give identical rows. The attacks are seeded as the fine-tuning chain's
evaluation (:mod:`rayrcm.eval.robust`): PGD's random start per image index, AutoAttack's draws per
batch (keyed by its first image index); with ``shard_size`` a multiple of ``batch`` and the same seed
and batch size, the job's SA / PGD / AutoAttack counts are the chain's.

**Resume.** Finished shards are appended to ``<out_dir>/<name>/rows/part-*.parquet`` (temporary file
and rename: a part is whole or absent), one row per shard with the schema's columns plus ``key``,
``shard``, ``seconds``, ``device``. A rerun reads them and computes only the missing shards (a new
suite, corruption or severity under the same name adds shards); a rerun whose protocol (model file,
dataset, split, images, seed, shard size, batch, attack budget) differs is refused with one line.

**Shift** (``--suite ...,shift --shift NAME=PATH ...``, NAME ``cifar10.1`` (``--shift-path DIR``), ``sketch``,
``r``, ``stylized``): CIFAR-10.1 (``cifar10.1_v6_data.npy`` and ``..._labels.npy``) and the class-folder sets
of :mod:`rayrcm.data.shift` (ImageNet-Sketch, ImageNet-R, Stylized-ImageNet: cells ``imagenet-sketch``,
``imagenet-r``, ``stylized-imagenet``), read by the actors at the model's evaluation view. Folder sets are
restricted to the model's class list (``class_list``, default the dataset's class folders); ImageNet-R's
logits are masked to the classes present. For an ImageFolder model ``c_path`` is a released ImageNet-C
folder (``<corruption>/<severity>/<wnid>/``, cells ``imagenet-c``). ``protocol.json`` records each set's
folder and how many of the model's classes remain (``shift_sets``); a rerun reading a set from another
folder is refused.

**Outputs.** ``results.parquet``/``results.csv`` (the schema above), ``table.md``/``table.tex`` (a
headline row SA / PGD / AutoAttack (standard) / APGD-CE+APGD-T (upper bound) / CS-s per severity,
then every cell) and
``accuracy_vs_severity.png`` (one line per corruption); with tracking on, all of it is logged to an
MLflow run that is a child of the run that logged the model.

**Preparation** (the config and everything that can fail on bad input, before Ray) is
:mod:`rayrcm.orchestration.evaluate_prepare`; this module runs the job and writes its outputs, on the
skeleton it shares with ``rayrcm certify`` (:mod:`rayrcm.orchestration.results_job`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from rayrcm.analysis.robustness import (
    RESULT_COLUMNS,
    headline,
    headline_metric,
    metric_name,
    results_table,
    to_latex,
    to_markdown,
    write_outputs,
)
from rayrcm.eval.suite import (
    NOT_BUILT,
    SPLITS,
    SUITES,
    Cell,
    EvaluateConfig,
    config_from_args,
    validate,
)
from rayrcm.orchestration import results_job
from rayrcm.orchestration.evaluate_prepare import (
    PROTOCOL_FILE,
    ROW_COLUMNS,
    ROWS_DIR,
    RUN_FILE,
    Prepared,
    prepare,
    read_rows,
)
from rayrcm.orchestration.results_job import Pool, check_once, done_line, log_results

__all__ = [  # what callers import from here (the CLI, tests, benchmarks); most live in evaluate_prepare and eval.suite
    "NOT_BUILT", "PROTOCOL_FILE", "RESULT_COLUMNS", "ROWS_DIR", "ROW_COLUMNS", "RUN_FILE", "SPLITS", "SUITES", "Cell",
    "EvaluateConfig", "EvaluateResult", "Prepared", "config_from_args", "headline", "prepare", "read_rows",
    "results_table", "run", "to_latex", "to_markdown", "validate",
]


@dataclass
class EvaluateResult:
    name: str
    out: Path
    run_id: str | None
    rows: pd.DataFrame  # one per shard
    table: pd.DataFrame  # one per cell: the result schema
    metrics: dict[str, float]
    computed: int  # shards computed by this invocation


class _Progress(results_job.Progress):
    """Finished shards into Parquet parts; the rate counts images."""

    waiting = "starting workers"

    def __init__(self, p: Prepared, logger: Any) -> None:
        super().__init__(p.out, len(p.rows), len(p.rows) - len(p.todo), label=f"evaluate {p.name}", unit="shard",
                         flush_every=p.cfg.flush_every, every_s=p.cfg.progress_every_s, logger=logger)
        self.by_key = {r["key"]: r for r in p.rows}
        self.images = 0

    def add(self, batch: dict[str, Any]) -> None:
        records = []
        for key, images, correct, per_class, seconds, device in zip(
                batch["key"], batch["images"], batch["correct"], batch["per_class"], batch["seconds"], batch["device"]):
            r = self.by_key[str(key)]
            records.append({"key": r["key"], "model": r["model"], "set": r["set"], "corruption": r["corruption"],
                            "severity": int(r["severity"]), "generated": bool(r["generated"]),
                            "attack": r["attack"], "shard": int(r["shard"]), "images": int(images),
                            "correct": int(correct), "per_class": str(per_class), "seconds": float(seconds),
                            "device": str(device)})
            self.images += int(images)
        self.done(records)

    def work(self) -> int:
        return self.images

    def state(self, rate: float) -> str:
        return f"{rate:,.0f} images/s"

    def line(self, rate: float, elapsed: float, left: str, part: float) -> str:
        return f"[rayrcm] evaluate: {self.done_count}/{self.total} shards, {rate:,.0f} images/s, {elapsed:.0f} s elapsed, {left}"

    def metrics(self, rate: float) -> dict[str, float]:
        return {"progress/shards_done": self.done_count, "progress/images_per_s": rate}


class EvaluateJob(results_job.ResultsJob[Prepared, EvaluateResult]):
    """``rayrcm evaluate`` on the results-job skeleton (:mod:`rayrcm.orchestration.results_job`)."""

    def stale(self, p: Prepared) -> bool:
        return bool(set(read_rows(p.out)["key"]) - p.finished)

    def pool(self, p: Prepared) -> Pool:
        c = p.cfg
        return Pool(c.workers, c.use_gpu, c.gpus_per_worker, c.cpus_per_worker, "use_gpu")

    def run_params(self, p: Prepared) -> tuple[str, dict[str, Any], dict[str, str]]:
        cfg = p.cfg
        params = {"suite": ",".join(cfg.suite), "severities": ",".join(map(str, cfg.severities)),
                  "corruptions": ",".join(cfg.corruptions) or "all",
                  "corruption_source": "released" if cfg.c_path else "generated", "workers": cfg.workers,
                  "use_gpu": cfg.use_gpu, **{f"classes.{n}": v["classes"] for n, v in p.protocol["shift_sets"].items()}}
        tags = {"rayrcm.corruptions": "generated"} if not cfg.c_path and "corruptions" in cfg.suite else {}
        return "evaluate", params, tags

    def progress(self, p: Prepared, logger: Any) -> _Progress:
        return _Progress(p, logger)

    def announce(self, p: Prepared, progress: results_job.Progress) -> None:
        print(f"[rayrcm] evaluate: {p.name}: {len(p.cells)} cells x {len(p.indices)} images in {progress.total} shards "
              f"({progress.before} already done); results in {p.out}", flush=True)
        for n, v in p.protocol["shift_sets"].items():
            print(f"[rayrcm] evaluate: {n}: {v['classes']} of {v['of']} classes remain, {v['images']:,} images"
                  + (", logits masked to those classes" if v.get("masked") else "") + f" ({v['path']})", flush=True)

    def compute(self, p: Prepared, progress: results_job.Progress) -> None:
        from rayrcm.orchestration.evaluate_actor import EvalActor

        assert isinstance(progress, _Progress)
        items = [{k: r[k] for k in ("key", "source", "set", "corruption", "severity", "attack", "start", "stop", "index")}
                 for r in p.todo]
        refs = {"model_ref": p.model_file.read_bytes(), "images_ref": p.images, "labels_ref": p.labels}
        results_job.stream(items, EvalActor, refs=refs, kwargs={"settings": p.settings}, pool=self.pool(p), per_call=1,
                           add=progress.add, progress=progress)

    def finish(self, p: Prepared, run_id: str | None, logger: Any, progress: results_job.Progress,
               show_table: bool) -> EvaluateResult:
        assert isinstance(progress, _Progress)
        return _finish(p, run_id, logger, progress, show_table)


JOB = EvaluateJob()


def run(cfg: EvaluateConfig, *, ray_init: dict[str, Any] | None = None, prepared: Prepared | None = None,
        show_table: bool = True) -> EvaluateResult:
    """Evaluate the job's missing shards; resumes when the same job ran before. One job at a time
    writes a results folder (:func:`~rayrcm.orchestration.job_files.folder_lock`)."""
    return results_job.run(JOB, lambda: prepare(cfg), ray_init=ray_init, prepared=prepared, show_table=show_table)


def _per_class(p: Prepared, rows: pd.DataFrame, metrics: dict[str, float]) -> list[Path]:
    """``per_class.csv`` / ``per_class.md`` (every cell per true class) and the worst-class metrics."""
    from rayrcm.analysis.per_class import (
        evaluation_classes,
        evaluation_classes_markdown,
        worst_class_headline,
    )

    classes = evaluation_classes(rows, p.model_ref)
    if classes is None:
        return []
    classes.to_csv(p.out / "per_class.csv", index=False)
    (p.out / "per_class.md").write_text(evaluation_classes_markdown(classes) + "\n")
    worst = worst_class_headline(classes)
    metrics.update({"worst_class_" + headline_metric(k.removeprefix("worst-class ")): v for k, v in worst.items()})
    if worst:
        print("[rayrcm] evaluate: worst class: " + ", ".join(f"{k.removeprefix('worst-class ')} {v:.3f}"
                                                             for k, v in worst.items())
              + f" (per class: {p.out / 'per_class.md'})", flush=True)
    return [p.out / "per_class.csv", p.out / "per_class.md"]


def _finish(p: Prepared, run_id: str | None, logger: Any, progress: _Progress, show_table: bool) -> EvaluateResult:
    rows = read_rows(p.out)
    check_once(p.out, rows, "key", "a shard")
    table = results_table(rows, p.model_ref)
    generated = bool(table["generated"].any()) if len(table) else False
    title = f"{p.name}" + (" (generated corruptions: CIFAR-10-C parameters, new draws)" if generated else "")
    files = write_outputs(table, p.out, title)
    head = headline(table)
    metrics = {headline_metric(k): v for k, v in head.items()}
    metrics.update({metric_name(r): float(r.accuracy) for r in table.itertuples()})
    files += _per_class(p, rows, metrics)
    computed = progress.done_count - progress.before
    wall = time.perf_counter() - progress.tic
    extra = {"progress/wall_seconds": wall, "progress/images_per_s": progress.images / max(wall, 1e-9)}
    log_results(p, run_id, logger, int(table["images"].sum()) if len(table) else 0,
                {**metrics, **(extra if computed else {})}, [p.out / PROTOCOL_FILE, *files])
    print(done_line(f"evaluate done: {len(table)} cells", p.out, computed, " shards", wall), flush=True)
    if generated:
        print("[rayrcm] corruptions marked 'generated' are new draws with CIFAR-10-C's parameters, not the released "
              "files: not comparable with published CIFAR-10-C numbers", flush=True)
    if show_table:
        print(to_markdown(table), flush=True)
    return EvaluateResult(p.name, p.out, run_id, rows, table, metrics, computed)
