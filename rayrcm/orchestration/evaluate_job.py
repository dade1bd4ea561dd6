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
:mod:`rayrcm.orchestration.evaluate_prepare`; this module runs the job and writes its outputs.
"""

from __future__ import annotations

import json
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
from rayrcm.orchestration import job_files, lineage, live, tracking
from rayrcm.orchestration.evaluate_prepare import (
    PROTOCOL_FILE,
    ROW_COLUMNS,
    ROWS_DIR,
    RUN_FILE,
    Prepared,
    prepare,
    read_rows,
)

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


class _Progress:
    """Buffers finished shards into Parquet parts; prints (and logs) progress every few seconds, or
    draws a live bar in a terminal (:mod:`rayrcm.orchestration.live`)."""

    def __init__(self, p: Prepared, logger: Any) -> None:
        self.p, self.logger = p, logger
        self.by_key = {r["key"]: r for r in p.rows}
        self.total, self.before = len(p.rows), len(p.rows) - len(p.todo)
        self.done_count, self.images = self.before, 0
        self.buffer: list[dict[str, Any]] = []  # finished shards' records not written yet
        self.tic = self.last = time.perf_counter()
        self.bar = live.bar(self.total, f"evaluate {p.name}", "shard", initial=self.before) if live.interactive() else None

    def flush(self) -> None:
        from rayrcm.certify.collect import write_part

        write_part(self.p.out / ROWS_DIR, self.buffer)
        self.buffer = []

    def add(self, batch: dict[str, Any]) -> None:
        for key, images, correct, per_class, seconds, device in zip(
                batch["key"], batch["images"], batch["correct"], batch["per_class"], batch["seconds"], batch["device"]):
            r = self.by_key[str(key)]
            self.buffer.append({"key": r["key"], "model": r["model"], "set": r["set"], "corruption": r["corruption"],
                                "severity": int(r["severity"]), "generated": bool(r["generated"]),
                                "attack": r["attack"], "shard": int(r["shard"]), "images": int(images),
                                "correct": int(correct), "per_class": str(per_class), "seconds": float(seconds),
                                "device": str(device)})
            self.done_count += 1
            self.images += int(images)
        if len(self.buffer) >= self.p.cfg.flush_every:
            self.flush()

    def tick(self, final: bool = False) -> None:
        now = time.perf_counter()
        rate = self.images / max(now - self.tic, 1e-9)
        if self.bar is not None:
            live.advance(self.bar, self.done_count, f"{rate:,.0f} images/s", final)
        if not final and now - self.last < self.p.cfg.progress_every_s:
            return
        self.flush()
        self.last = now
        new = self.done_count - self.before
        left = f"~{(now - self.tic) / new * (self.total - self.done_count):.0f} s left" if new else "starting workers"
        if self.bar is None:
            print(f"[rayrcm] evaluate: {self.done_count}/{self.total} shards, {rate:,.0f} images/s, "
                  f"{now - self.tic:.0f} s elapsed, {left}", flush=True)
        if self.logger:
            self.logger.log(self.done_count, {"progress/shards_done": self.done_count, "progress/images_per_s": rate})


def _evaluate_all(p: Prepared, progress: _Progress) -> None:
    """Stream the missing shards through the actor pool."""
    import ray
    from ray.data import ActorPoolStrategy

    from rayrcm.orchestration import console
    from rayrcm.orchestration.evaluate_actor import EvalActor

    console.quiet_data()
    c = p.cfg
    todo = p.todo
    model_ref = ray.put(p.model_file.read_bytes())
    images_ref, labels_ref = ray.put(p.images), ray.put(p.labels)
    items = [{k: r[k] for k in ("key", "source", "set", "corruption", "severity", "attack", "start", "stop", "index")}
             for r in todo]
    ds: ray.data.Dataset = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(
        EvalActor,
        fn_constructor_kwargs={"model_ref": model_ref, "images_ref": images_ref, "labels_ref": labels_ref,
                               "settings": p.settings},
        batch_size=1,
        compute=ActorPoolStrategy(size=c.workers),
        num_gpus=c.gpus_per_worker if c.use_gpu else 0,
        num_cpus=c.cpus_per_worker,
    )
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1):
        progress.add(batch)
        progress.tick()
    progress.tick(final=True)


def _start(p: Prepared) -> str | None:
    """Write the protocol next to the rows; find or create the job's MLflow run (an existing run
    keeps its status until there is work to do)."""
    cfg = p.cfg
    params = {"suite": ",".join(cfg.suite), "severities": ",".join(map(str, cfg.severities)),
              "corruptions": ",".join(cfg.corruptions) or "all",
              "corruption_source": "released" if cfg.c_path else "generated", "workers": cfg.workers,
              "use_gpu": cfg.use_gpu, **{f"classes.{n}": v["classes"] for n, v in p.protocol["shift_sets"].items()}}
    tags = {"rayrcm.corruptions": "generated"} if not cfg.c_path and "corruptions" in cfg.suite else {}
    return tracking.start_results_run(p, PROTOCOL_FILE, "evaluate", params, tags)


def run(cfg: EvaluateConfig, *, ray_init: dict[str, Any] | None = None, prepared: Prepared | None = None,
        show_table: bool = True) -> EvaluateResult:
    """Evaluate the job's missing shards; resumes when the same job ran before. One job at a time
    writes a results folder (:func:`~rayrcm.orchestration.job_files.folder_lock`)."""
    p = prepared or prepare(cfg)
    with job_files.folder_lock(p.out, p.name):
        if set(read_rows(p.out)["key"]) - p.finished:  # another job finished shards since we looked
            p = prepare(cfg)
        return _run_locked(p, ray_init, show_table)


def _run_locked(p: Prepared, ray_init: dict[str, Any] | None, show_table: bool) -> EvaluateResult:
    if p.todo:
        from rayrcm.orchestration.cluster import ensure_ray, require_gpus

        ensure_ray(**(ray_init or {}))
        require_gpus("use_gpu", p.cfg.workers * p.cfg.gpus_per_worker if p.cfg.use_gpu else 0)
    run_id = _start(p)
    ok = False
    try:
        result = _run(p, run_id, show_table)
        ok = True
    finally:
        if not ok and p.uri and run_id:
            tracking.fail_if_running(p.uri, run_id)
    return result


def _run(p: Prepared, run_id: str | None, show_table: bool) -> EvaluateResult:
    logger = None
    if run_id and p.uri:  # a run id comes with the tracking URI it was opened at
        (p.out / RUN_FILE).write_text(json.dumps({"tracking_uri": p.uri, "run_id": run_id}))
        logger = tracking.MetricLogger(p.uri, run_id)
    progress = _Progress(p, logger)
    print(f"[rayrcm] evaluate: {p.name}: {len(p.cells)} cells x {len(p.indices)} images in {progress.total} shards "
          f"({progress.before} already done); results in {p.out}", flush=True)
    for n, v in p.protocol["shift_sets"].items():
        print(f"[rayrcm] evaluate: {n}: {v['classes']} of {v['of']} classes remain, {v['images']:,} images"
              + (", logits masked to those classes" if v.get("masked") else "") + f" ({v['path']})", flush=True)
    if p.todo:
        if run_id and p.uri:
            tracking.mark_running(p.uri, run_id)
        try:
            _evaluate_all(p, progress)
        except BaseException:
            try:  # keep the shards finished so far for the rerun; the first error is the news
                progress.flush()
            except Exception:  # noqa: BLE001
                pass
            raise
    return _finish(p, run_id, logger, progress, show_table)


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
    dup = rows["key"].duplicated()
    if dup.any():
        raise RuntimeError(f"{p.out}: a shard was written twice: {rows['key'][dup].tolist()[:5]}")
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
    if logger and p.uri and run_id:  # a logger is made for a run (at p.uri)
        extra = {"progress/wall_seconds": wall, "progress/images_per_s": progress.images / max(wall, 1e-9)}
        logger.log(int(table["images"].sum()) if len(table) else 0, {**metrics, **(extra if computed else {})})
        for f in [p.out / PROTOCOL_FILE, *files]:
            logger.log_artifact(f)
        logger.log_folder(p.out / ROWS_DIR, ROWS_DIR)
        lineage.finish_run(p.uri, run_id)
    print(f"[rayrcm] evaluate done: {len(table)} cells in {p.out}"
          + (f", {computed} shards computed in {wall:.1f} s" if computed else ", nothing left to compute"), flush=True)
    if generated:
        print("[rayrcm] corruptions marked 'generated' are new draws with CIFAR-10-C's parameters, not the released "
              "files: not comparable with published CIFAR-10-C numbers", flush=True)
    if show_table:
        print(to_markdown(table), flush=True)
    return EvaluateResult(p.name, p.out, run_id, rows, table, metrics, computed)
