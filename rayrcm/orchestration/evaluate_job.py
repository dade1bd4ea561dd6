"""The robustness evaluation suite as one Ray Data job: clean accuracy, common corruptions
(generated or released), PGD and AutoAttack, sharded over actors, resumable, with one result schema.

    rayrcm evaluate --model REF --suite clean,corruptions,pgd,aa --severities 1,3,5

**Result schema** (one row per evaluated cell; ``results.parquet`` / ``results.csv`` of the job
folder, :data:`RESULT_COLUMNS`):

========== ==========================================================================================
model      the model reference as given (``models:/...``, a run id, a path)
set        the image set: the clean split's dataset (``digits``, ``cifar10``), a generated corruption
           set (``<dataset>-c-generated``), a released one (``cifar10-c``, ``cifar100-c``), or a shifted
           set (``cifar10.1``; its own images, ``skip``/``max_images`` applied to them too)
corruption ``none`` for a clean set, else the corruption's name (``contrast``, ...)
severity   0 for a clean set, else 1-5
generated  True for corruptions generated here (new random draws with CIFAR-10-C's parameters, keyed by
           ``(seed, image index, corruption, severity)``; not comparable with published CIFAR-10-C numbers)
attack     ``none``, ``pgd<k>`` (L-inf PGD-k, random start), ``aa`` (the standard AutoAttack: APGD-CE,
           APGD-T, FAB-T, Square; "AutoAttack (standard)" in the tables) or ``aa-apgd`` (APGD-CE then
           APGD-T only: "APGD-CE+APGD-T (upper bound)", faster; :mod:`rayrcm.attacks.autoattack`)
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
count, so 1 and N actors give identical rows.

**Resume.** Finished shards are appended to ``<out_dir>/<name>/rows/part-*.parquet`` (temporary file
and rename: a part is whole or absent), one row per shard with the schema's columns plus ``key``,
``shard``, ``seconds``, ``device``. A rerun reads them and computes only the missing shards (a new
suite, corruption or severity under the same name adds shards); a rerun whose protocol (model file,
dataset, split, images, seed, shard size, batch, attack budget) differs is refused with one line.

**Shift** (``--suite ...,shift --shift-path DIR``): CIFAR-10.1 (``cifar10.1_v6_data.npy`` and
``..._labels.npy``, read by the actors like the released corruptions). The class-folder sets of
:mod:`rayrcm.data.shift` (ImageNet-Sketch, ImageNet-R, Stylized-ImageNet) are not wired in yet.

**Outputs.** ``results.parquet``/``results.csv`` (the schema above), ``table.md``/``table.tex`` (a
headline row SA / PGD / AutoAttack (standard) / APGD-CE+APGD-T (upper bound) / CS-s per severity,
then every cell) and
``accuracy_vs_severity.png`` (one line per corruption); with tracking on, all of it is logged to an
MLflow run that is a child of the run that logged the model.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from rayrcm.analysis.robustness import (
    NONE,
    RESULT_COLUMNS,
    headline,
    headline_metric,
    metric_name,
    results_table,
    to_latex,
    to_markdown,
    write_outputs,
)
from rayrcm.errors import ConfigError
from rayrcm.orchestration import tracking
from rayrcm.overrides import check_finite, parse_dotted, update_dataclass
from rayrcm.sections import TrackingConfig, check_job_name, default_storage

PROTOCOL_FILE = "protocol.json"
RUN_FILE = "mlflow_run.json"
ROWS_DIR = "rows"
ROW_COLUMNS = ["key", "model", "set", "corruption", "severity", "generated", "attack", "shard", "images", "correct",
               "seconds", "device"]
SUITES = ("clean", "corruptions", "pgd", "aa-apgd", "aa", "shift")
NOT_BUILT: dict[str, str] = {}  # suite part -> why it is refused (none today)
SPLITS = ("test", "val")

__all__ = ["EvaluateConfig", "EvaluateResult", "RESULT_COLUMNS", "config_from_args", "headline", "prepare",
           "results_table", "run", "to_latex", "to_markdown"]


@dataclass(frozen=True)
class EvaluateConfig:
    """One evaluation job. Every key is a ``--set KEY=VALUE`` of ``rayrcm evaluate``."""

    model: str = ""  # models:/name@alias, models:/name/3, runs:/<id>/model, a run id, or a model.pt path
    suite: tuple[str, ...] = ("clean", "corruptions")
    severities: tuple[int, ...] = (1, 3, 5)
    corruptions: tuple[str, ...] = ()  # () = every generated corruption (or every file of c_path)
    c_path: str = ""  # a released CIFAR-10-C / CIFAR-100-C folder; "" = generate the corruptions
    shift_path: str = ""  # the CIFAR-10.1 folder of the ``shift`` part
    dataset: str = ""  # default: the dataset the model was trained on
    data_path: str = ""  # default: the model's training data path
    split: str = "test"
    skip: int = 1  # every skip-th image of the split
    max_images: int = 0  # at most this many images (after skip); 0 = all
    seed: int = 0  # corruption draws and attack starts
    shard_size: int = 500  # images per row of work
    batch: int = 256  # images per forward pass
    eps: float = 8 / 255  # L-inf budget of pgd, aa and aa-apgd, [0, 1] pixel units
    step_size: float = 2 / 255
    pgd_steps: int = 20
    aa_iters: int = 100  # APGD's and FAB-T's iterations
    aa_targets: int = 9  # APGD-T's and FAB-T's target classes
    aa_queries: int = 5000  # Square's queries (aa)
    name: str = ""  # job name (results folder and MLflow run); rerunning it resumes
    out_dir: str = field(default_factory=lambda: default_storage("evaluate"))
    workers: int = 1
    use_gpu: bool = False
    gpus_per_worker: float = 1.0
    cpus_per_worker: float = 1.0
    flush_every: int = 8  # shards per Parquet part
    progress_every_s: float = 10.0
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig(experiment=""))  # "" = the model's
    plugins: tuple[str, ...] = ()


def config_from_args(overrides: list[str], base: EvaluateConfig | None = None) -> EvaluateConfig:
    """An :class:`EvaluateConfig` from ``key=value`` items (``suite=clean,pgd``; ``tracking.enabled=false``)."""
    return update_dataclass(base or EvaluateConfig(), parse_dotted(overrides))


def _check(ok: bool, key: str, value: object, allowed: str) -> None:
    if not ok:
        raise ConfigError(key, value, allowed)


def validate(cfg: EvaluateConfig) -> EvaluateConfig:
    """Every value that can be checked without the model or the data; one-line errors."""
    check_finite(cfg)
    _check(bool(cfg.model), "model", cfg.model, "give a registry URI, a run id or a model.pt path")
    _check(bool(cfg.suite), "suite", ",".join(cfg.suite), f"name at least one of: {', '.join(SUITES[:4])}")
    for s in cfg.suite:
        _check(s in SUITES, "suite", s, f"choose from: {', '.join(SUITES)}")
        _check(s not in NOT_BUILT, "suite", s, NOT_BUILT.get(s, ""))
    _check(len(set(cfg.suite)) == len(cfg.suite), "suite", ",".join(cfg.suite), "names a part twice")
    _check(bool(cfg.severities) and all(1 <= s <= 5 for s in cfg.severities), "severities",
           ",".join(map(str, cfg.severities)), "integers from 1 to 5, comma separated")
    _check(len(set(cfg.severities)) == len(cfg.severities), "severities", ",".join(map(str, cfg.severities)),
           "names a severity twice")
    _check(len(set(cfg.corruptions)) == len(cfg.corruptions), "corruptions", ",".join(cfg.corruptions),
           "names a corruption twice")
    if "corruptions" in cfg.suite and not cfg.c_path:  # generated: every name known before the model is read
        from rayrcm.data.corruptions import check_corruption

        for c in cfg.corruptions:
            check_corruption(c, cfg.severities[0])
    _check("shift" not in cfg.suite or bool(cfg.shift_path), "suite", "shift",
           "needs --shift-path: a CIFAR-10.1 folder (cifar10.1_v6_data.npy, cifar10.1_v6_labels.npy)")
    _check(cfg.split in SPLITS, "split", cfg.split, f"choose one of: {', '.join(SPLITS)}")
    _check(cfg.skip >= 1, "skip", cfg.skip, "must be >= 1")
    _check(cfg.max_images >= 0, "max_images", cfg.max_images, "must be >= 0 (0 = all)")
    _check(cfg.seed >= 0, "seed", cfg.seed, "must be >= 0")
    _check(cfg.shard_size >= 1, "shard_size", cfg.shard_size, "must be >= 1")
    _check(cfg.batch >= 1, "batch", cfg.batch, "must be >= 1")
    _check(0 < cfg.eps <= 1, "eps", cfg.eps, "must be in (0, 1] (L-inf, [0, 1] pixel units)")
    _check(cfg.step_size > 0, "step_size", cfg.step_size, "must be > 0")
    _check(cfg.pgd_steps >= 1 and cfg.aa_iters >= 1 and cfg.aa_targets >= 1, "pgd_steps",
           (cfg.pgd_steps, cfg.aa_iters, cfg.aa_targets), "steps, iterations and targets must be >= 1")
    _check(cfg.aa_queries >= 1, "aa_queries", cfg.aa_queries, "must be >= 1")
    _check(cfg.workers >= 1, "workers", cfg.workers, "must be >= 1")
    _check(cfg.gpus_per_worker > 0 and cfg.cpus_per_worker > 0, "cpus_per_worker",
           (cfg.gpus_per_worker, cfg.cpus_per_worker), "resources per worker must be > 0")
    _check(cfg.flush_every >= 1, "flush_every", cfg.flush_every, "must be >= 1")
    _check(all(p.strip() for p in cfg.plugins), "plugins", cfg.plugins, "give module names or .py files")
    if cfg.name:
        check_job_name("name", cfg.name)
    return cfg


# ----------------------------------------------------------------------------- preparation


@dataclass(frozen=True)
class Cell:
    """One evaluated cell of the result schema and where its images come from."""

    set: str
    corruption: str
    severity: int
    generated: bool
    attack: str
    source: str  # clean | generated | released | cifar10.1 (see evaluate_actor.shard_images)
    size: int = 0  # images of the cell's own set (a shifted set); 0 = the job's clean images


@dataclass
class Prepared:
    cfg: EvaluateConfig
    uri: str | None
    name: str
    out: Path
    model_ref: str
    model_file: Path
    meta: dict[str, Any]
    dataset: str
    indices: list[int]
    images: Any  # uint8 (K, 3, H, W) clean evaluation views of ``indices`` (empty when no shard needs them)
    labels: Any
    cells: list[Cell]
    rows: list[dict[str, Any]]  # every shard of the job
    finished: set[str]  # keys already written
    protocol: dict[str, Any]
    experiment: str
    parent_run_id: str | None
    settings: Any  # evaluate_actor.ShardSettings

    @property
    def todo(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["key"] not in self.finished]


def _cells(cfg: EvaluateConfig, dataset: str, num_classes: int) -> list[Cell]:
    from rayrcm.data.corruptions import check_corruption, corruption_names, generated_set_name

    out: list[Cell] = []
    for part in cfg.suite:
        if part == "clean":
            out.append(Cell(dataset, NONE, 0, False, NONE, "clean"))
        elif part == "pgd":
            out.append(Cell(dataset, NONE, 0, False, f"pgd{cfg.pgd_steps}", "clean"))
        elif part in ("aa", "aa-apgd"):
            out.append(Cell(dataset, NONE, 0, False, part, "clean"))
        elif part == "corruptions" and cfg.c_path:
            from rayrcm.data.shift import cifar_c_corruptions

            names = list(cfg.corruptions) or cifar_c_corruptions(cfg.c_path)
            if not names:
                raise ConfigError("c_path", cfg.c_path, "holds no <corruption>.npy file")
            released = "cifar100-c" if num_classes == 100 else "cifar10-c"
            out += [Cell(released, c, s, False, NONE, "released") for c in names for s in cfg.severities]
        elif part == "corruptions":
            names = list(cfg.corruptions) or corruption_names()
            for c in names:
                for s in cfg.severities:
                    check_corruption(c, s)
            gen = generated_set_name(dataset)
            out += [Cell(gen, c, s, True, NONE, "generated") for c in names for s in cfg.severities]
        elif part == "shift":
            from rayrcm.data.shift import read_cifar10_1

            if num_classes != 10:
                raise ConfigError("suite", "shift",
                                  f"CIFAR-10.1 has CIFAR-10's 10 classes; the model has {num_classes}")
            out.append(Cell("cifar10.1", NONE, 0, False, NONE, "cifar10.1", len(read_cifar10_1(cfg.shift_path))))
    return out


def _check_released(cfg: EvaluateConfig, cells: list[Cell], indices: list[int], num_classes: int) -> None:
    """Every released file there, readable, and long enough for the job's images (one line each)."""
    from rayrcm.data.shift import read_cifar_c

    top = max(indices)
    for cell in cells:
        if cell.source != "released":
            continue
        ds = read_cifar_c(cfg.c_path, cell.corruption, cell.severity, num_classes=num_classes)
        if len(ds) <= top:
            raise ConfigError("c_path", cfg.c_path, f"{cell.corruption}.npy has {len(ds)} images per severity; "
                              f"the job's images go up to index {top}")


def _select(n: int, skip: int, max_images: int) -> list[int]:
    indices = list(range(0, n, skip))
    return indices[:max_images] if max_images else indices


def _shards(cells: list[Cell], indices: list[int], size: int, model_ref: str, skip: int = 1,
            max_images: int = 0) -> list[dict[str, Any]]:
    """Every row of work: a cell's image list (the job's, or its own set's) cut into ``size`` positions."""
    rows = []
    for cell in cells:
        own = _select(cell.size, skip, max_images) if cell.size else indices
        for shard, start in enumerate(range(0, len(own), size)):
            stop = min(start + size, len(own))
            key = f"{cell.set}|{cell.corruption}|{cell.severity}|{cell.attack}|{shard}"
            fields = {k: v for k, v in asdict(cell).items() if k != "size"}
            rows.append({"key": key, "model": model_ref, **fields, "shard": shard, "start": start, "stop": stop,
                         "index": list(own[start:stop])})
    return rows


def _check_protocol(out: Path, protocol: dict[str, Any], name: str) -> None:
    from rayrcm.certify.protocol import protocol_diff

    f = out / PROTOCOL_FILE
    if not f.is_file():
        return
    old = json.loads(f.read_text())
    old.pop("model", None)
    old.setdefault("aa_queries", EvaluateConfig.aa_queries)  # recorded before Square ran: its default
    diff = protocol_diff(old, protocol)
    if diff:
        raise ConfigError("name", name,
                          f"holds results of another protocol ({'; '.join(diff[:3])}); choose another --name")


def read_rows(out: Path) -> pd.DataFrame:
    """Every shard row written under ``out/rows`` (an empty frame with the row columns when none)."""
    parts = sorted((out / ROWS_DIR).glob("part-*.parquet"))
    if not parts:
        return pd.DataFrame(columns=ROW_COLUMNS)
    return pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)


def prepare(cfg: EvaluateConfig) -> Prepared:
    """Everything that can fail on bad input, before any Ray work."""
    import hashlib

    from rayrcm.data import DATASETS
    from rayrcm.data.datasets import eval_images, eval_split
    from rayrcm.orchestration.certify_prepare import _data_config, _load_model, _sha256
    from rayrcm.orchestration.evaluate_actor import ShardSettings
    from rayrcm.plugins import load_plugins

    cfg = validate(cfg)
    load_plugins(cfg.plugins, key="plugins")
    uri = None
    if cfg.tracking.enabled:
        uri = tracking.normalize_uri(cfg.tracking.uri)
        tracking.check_reachable(uri)
    local, meta = _load_model(cfg, uri)  # type: ignore[arg-type]  # reads .model only
    data = _data_config(cfg, meta)  # type: ignore[arg-type]  # reads .dataset, .data_path
    if data.name not in DATASETS:
        raise ConfigError("dataset", data.name, f"unknown dataset; choose one of: {', '.join(DATASETS.names())}")
    DATASETS.get(data.name).check_path(data.path)
    ds, num_classes, large = eval_split(data, cfg.split)
    if num_classes != meta["num_classes"]:
        raise ConfigError("model", cfg.model,
                          f"has {meta['num_classes']} classes but dataset {data.name} has {num_classes}")
    indices = _select(len(ds), cfg.skip, cfg.max_images)  # type: ignore[arg-type]
    if not indices:
        raise ConfigError("max_images", cfg.max_images, "selects no image")
    if cfg.c_path and not Path(cfg.c_path).expanduser().is_dir():
        raise ConfigError("c_path", cfg.c_path, "no such folder (a released CIFAR-10-C / CIFAR-100-C folder of "
                          "<corruption>.npy files and labels.npy; nothing is downloaded)")
    cells = _cells(cfg, data.name, num_classes)
    _check_released(cfg, cells, indices, num_classes)
    sha = _sha256(local)
    name = cfg.name or f"evaluate-{data.name}-{cfg.split}-{sha[:8]}-seed{cfg.seed}"
    check_job_name("name" if cfg.name else "dataset", name)
    out = Path(cfg.out_dir).expanduser().resolve() / name
    protocol = {
        "model_sha256": sha, "dataset": data.name, "split": cfg.split, "num_classes": num_classes,
        "image_size": data.image_size, "crop_pct": data.crop_pct if large else None, "images": len(indices),
        "indices_sha1": hashlib.sha1(",".join(map(str, indices)).encode()).hexdigest(), "seed": cfg.seed,
        "shard_size": cfg.shard_size, "batch": cfg.batch, "norm": "linf", "eps": cfg.eps, "step_size": cfg.step_size,
        "pgd_steps": cfg.pgd_steps, "aa_iters": cfg.aa_iters, "aa_targets": cfg.aa_targets,
        "aa_queries": cfg.aa_queries,
    }
    _check_protocol(out, protocol, name)
    rows = _shards(cells, indices, cfg.shard_size, cfg.model, cfg.skip, cfg.max_images)
    done = read_rows(out)
    finished = set(done["key"].astype(str)) if len(done) else set()
    todo = [r for r in rows if r["key"] not in finished]
    if any(r["source"] in ("clean", "generated") for r in todo):
        images, labels = eval_images(ds, indices, data.image_size, large=large, crop_pct=data.crop_pct)
    else:
        import torch

        images, labels = torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.long)
    parent, experiment = (None, None)
    if uri:
        parent, experiment = tracking.model_lineage(cfg.model, uri)
    experiment = cfg.tracking.experiment or experiment or "rayrcm-evaluate"
    settings = ShardSettings(seed=cfg.seed, batch=cfg.batch, eps=cfg.eps, step_size=cfg.step_size,
                             pgd_steps=cfg.pgd_steps, aa_iters=cfg.aa_iters, aa_targets=cfg.aa_targets,
                             aa_queries=cfg.aa_queries, image_size=data.image_size, num_classes=num_classes,
                             c_path=str(Path(cfg.c_path).expanduser().resolve()) if cfg.c_path else "",
                             shift_path=str(Path(cfg.shift_path).expanduser().resolve()) if cfg.shift_path else "",
                             use_gpu=cfg.use_gpu, cpus_per_worker=cfg.cpus_per_worker, plugins=cfg.plugins)
    return Prepared(cfg, uri, name, out, cfg.model, local, meta, data.name, indices, images, labels, cells, rows,
                    finished, protocol, experiment, parent, settings)


# ----------------------------------------------------------------------------- the job


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
    """Buffers finished shards into Parquet parts; prints (and logs) progress every few seconds."""

    def __init__(self, p: Prepared, logger: Any) -> None:
        self.p, self.logger = p, logger
        self.by_key = {r["key"]: r for r in p.rows}
        self.total, self.before = len(p.rows), len(p.rows) - len(p.todo)
        self.done_count, self.images, self.buffer = self.before, 0, []
        self.tic = self.last = time.perf_counter()

    def flush(self) -> None:
        from rayrcm.certify.collect import write_part

        write_part(self.p.out / ROWS_DIR, self.buffer)
        self.buffer = []

    def add(self, batch: dict[str, Any]) -> None:
        for key, images, correct, seconds, device in zip(batch["key"], batch["images"], batch["correct"],
                                                         batch["seconds"], batch["device"]):
            r = self.by_key[str(key)]
            self.buffer.append({"key": r["key"], "model": r["model"], "set": r["set"], "corruption": r["corruption"],
                                "severity": int(r["severity"]), "generated": bool(r["generated"]),
                                "attack": r["attack"], "shard": int(r["shard"]), "images": int(images),
                                "correct": int(correct), "seconds": float(seconds), "device": str(device)})
            self.done_count += 1
            self.images += int(images)
        if len(self.buffer) >= self.p.cfg.flush_every:
            self.flush()

    def tick(self, final: bool = False) -> None:
        now = time.perf_counter()
        if not final and now - self.last < self.p.cfg.progress_every_s:
            return
        self.flush()
        self.last = now
        rate = self.images / max(now - self.tic, 1e-9)
        new = self.done_count - self.before
        left = f"~{(now - self.tic) / new * (self.total - self.done_count):.0f} s left" if new else "starting workers"
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
    items = [{k: r[k] for k in ("key", "source", "corruption", "severity", "attack", "start", "stop", "index")}
             for r in todo]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
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
    p.out.mkdir(parents=True, exist_ok=True)
    (p.out / PROTOCOL_FILE).write_text(json.dumps({**p.protocol, "model": p.model_ref}, indent=1, sort_keys=True))
    if not p.uri:
        return None
    cfg = p.cfg
    params = {**{f"protocol.{k}": v for k, v in p.protocol.items()}, "model": p.model_ref,
              "suite": ",".join(cfg.suite), "severities": ",".join(map(str, cfg.severities)),
              "corruptions": ",".join(cfg.corruptions) or "all", "corruption_source": "released" if cfg.c_path else
              "generated", "workers": cfg.workers, "use_gpu": cfg.use_gpu}
    tags = {"rayrcm.stage": "evaluate", "rayrcm.model_uri": p.model_ref}
    if not cfg.c_path and "corruptions" in cfg.suite:
        tags["rayrcm.corruptions"] = "generated"
    return tracking.start_job_run(p.uri, p.experiment, p.name, params, tags=tags, parent_run_id=p.parent_run_id,
                                  reopen=False)


def run(cfg: EvaluateConfig, *, ray_init: dict[str, Any] | None = None, prepared: Prepared | None = None,
        show_table: bool = True) -> EvaluateResult:
    """Evaluate the job's missing shards; resumes when the same job ran before."""
    p = prepared or prepare(cfg)
    if p.todo:
        from rayrcm.orchestration.trainer import ensure_ray, require_gpus

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
    if run_id:
        (p.out / RUN_FILE).write_text(json.dumps({"tracking_uri": p.uri, "run_id": run_id}))
        logger = tracking.MetricLogger(p.uri, run_id)
    progress = _Progress(p, logger)
    print(f"[rayrcm] evaluate: {p.name}: {len(p.cells)} cells x {len(p.indices)} images in {progress.total} shards "
          f"({progress.before} already done); results in {p.out}", flush=True)
    if p.todo:
        if run_id:
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
    computed = progress.done_count - progress.before
    wall = time.perf_counter() - progress.tic
    if logger:
        extra = {"progress/wall_seconds": wall, "progress/images_per_s": progress.images / max(wall, 1e-9)}
        logger.log(int(table["images"].sum()) if len(table) else 0, {**metrics, **(extra if computed else {})})
        for f in [p.out / PROTOCOL_FILE, *files]:
            logger.log_artifact(f)
        logger.log_artifact(p.out / ROWS_DIR, ROWS_DIR)
        tracking.end_run(p.uri, run_id, ok=True)
    print(f"[rayrcm] evaluate done: {len(table)} cells in {p.out}"
          + (f", {computed} shards computed in {wall:.1f} s" if computed else ", nothing left to compute"), flush=True)
    if generated:
        print("[rayrcm] corruptions marked 'generated' are new draws with CIFAR-10-C's parameters, not the released "
              "files: not comparable with published CIFAR-10-C numbers", flush=True)
    if show_table:
        print(to_markdown(table), flush=True)
    return EvaluateResult(p.name, p.out, run_id, rows, table, metrics, computed)
