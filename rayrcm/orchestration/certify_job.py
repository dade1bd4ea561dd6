"""Certification as a Ray Data job: rows of Monte Carlo work, counting actors, resumable Parquet.

Work is split into rows ``(image, role, chunk)`` (see :mod:`rayrcm.certify.smoothing`); a pool of
:class:`~rayrcm.orchestration.certify_actor.CountActor` (one per GPU, or CPU workers) loads the
model once and returns per-class counts per row. The driver sums the rows of each image; when
the last one arrives it computes the certificate from the totals.

Ordering: every row counts *all* classes, and ``c_A`` is taken from the selection counts after
both roles are in. This is the same test as counting ``c_A`` only, because the estimation draws
are independent of the selection draws (different generator seeds), and it lets selection and
estimation rows run in parallel.

Resume: finished images are appended to ``<out_dir>/<name>/rows/part-*.parquet`` (written to a
temporary file and renamed, so a part is whole or absent). A rerun of the same job reads them,
skips those images and never writes one twice; a rerun with another protocol is refused.
Rows that were in flight when a job died are simply recomputed: their noise is seeded, so the
counts are the same. Ray Data restarts a killed actor and retries its rows.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from rayrcm.analysis import (
    plot_curves,
    read_results,
    summary_metrics,
    summary_table,
    to_latex,
    to_markdown,
    write_cohen_tsv,
)
from rayrcm.analysis.results import ROWS_DIR, TSV_NAME, read_rows_dir
from rayrcm.certify.protocol import (
    CertifyConfig,
    protocol_dict,
    select_indices,
    short_sigma,
    validate_certify,
)
from rayrcm.certify.smoothing import ESTIMATION, PREDICTION, SELECTION, plan_rows
from rayrcm.certify.stats import certify_from_counts, predict_from_counts
from rayrcm.models.export import build_from_blob, export_kind, predicts_classes
from rayrcm.overrides import parse_dotted, to_flat_dict, update_dataclass
from rayrcm.sections import DataConfig
from rayrcm.errors import ConfigError
from rayrcm.orchestration import tracking
from rayrcm.train.checkpoint import load_model_file

PROTOCOL_FILE = "protocol.json"


@dataclass
class Prepared:
    cfg: CertifyConfig
    uri: str | None
    name: str
    out: Path
    model_ref: str
    model_file: Path
    meta: dict[str, Any]
    indices: list[int]
    images: torch.Tensor  # uint8 (K, C, H, W)
    labels: torch.Tensor
    protocol: dict[str, Any]
    finished: set[int]
    experiment: str
    parent_run_id: str | None
    warnings: list[str] = field(default_factory=list)


@dataclass
class CertifyResult:
    name: str
    out: Path
    run_id: str | None
    rows: pd.DataFrame
    table: pd.DataFrame
    metrics: dict[str, float]
    computed: int  # images certified by this invocation (the rest were already done)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _default_name(cfg: CertifyConfig, dataset: str, sha: str) -> str:
    s = cfg.smoothing
    parts = [cfg.mode, dataset, cfg.split, sha[:8], f"sigma-{short_sigma(s.sigma)}", f"n{s.n}"]
    if s.indices:
        parts.append("idx" + hashlib.sha1(",".join(map(str, s.indices)).encode()).hexdigest()[:6])
    else:
        parts += [f"skip{s.skip}"] + ([f"max{s.max}"] if s.max > 0 else [])
    return "-".join(parts + [f"seed{s.seed}"])


def _data_config(cfg: CertifyConfig, meta: dict[str, Any]) -> DataConfig:
    trained = meta["config"]["data"]
    name = cfg.dataset or trained["name"]
    path = cfg.data_path or (trained.get("path") if name == trained["name"] else None)
    return DataConfig(name=name, path=path or None, image_size=int(meta["image_size"]),
                      val_fraction=float(trained.get("val_fraction", 0.1)), crop_pct=float(trained.get("crop_pct", 0.875)))


def prepare(cfg: CertifyConfig) -> Prepared:
    """Everything that can fail on bad input, before any Ray work."""
    from rayrcm.data import DATASETS
    from rayrcm.data.datasets import eval_images, eval_split

    cfg = validate_certify(cfg)
    uri = None
    if cfg.tracking.enabled:
        uri = tracking.normalize_uri(cfg.tracking.uri)
        tracking.check_reachable(uri)
    local = tracking.resolve_model(cfg.model, uri)
    try:
        blob = load_model_file(local)
        meta = blob["meta"]
    except Exception as err:  # noqa: BLE001 - any unreadable file is a bad --model
        raise ConfigError("model", cfg.model, f"is not a rayrcm model file ({str(err).splitlines()[0][:160]})") from None
    if not predicts_classes(meta):
        raise ConfigError("model", cfg.model, f"is a{'n' if export_kind(meta)[0] in 'aeiou' else ''} {export_kind(meta)} "
                          "checkpoint; certification needs a model that predicts classes")
    try:
        build_from_blob(blob)
    except Exception as err:  # noqa: BLE001
        raise ConfigError("model", cfg.model, f"does not match its own config ({str(err).splitlines()[0][:160]})") from None
    data = _data_config(cfg, meta)
    if data.name not in DATASETS:
        raise ConfigError("dataset", data.name, f"unknown dataset; choose one of: {', '.join(DATASETS.names())}")
    DATASETS.get(data.name).check_path(data.path)
    ds, num_classes, large = eval_split(data, cfg.split)
    if num_classes != meta["num_classes"]:
        raise ConfigError("model", cfg.model, f"has {meta['num_classes']} classes but dataset {data.name} has {num_classes}")
    indices = select_indices(len(ds), cfg.smoothing)  # type: ignore[arg-type]
    if not indices:
        raise ConfigError("max", cfg.smoothing.max, "selects no image")
    sha = _sha256(local)
    name = cfg.name or _default_name(cfg, data.name, sha)
    out = Path(cfg.out_dir).expanduser().resolve() / name
    protocol = protocol_dict(cfg, dataset=data.name, model_sha256=sha, num_classes=num_classes, indices=indices)
    protocol["indices_sha1"] = hashlib.sha1(",".join(map(str, indices)).encode()).hexdigest()
    _check_protocol(out, protocol, name)
    done = read_rows_dir(out)
    finished = set(int(i) for i in done["idx"]) if len(done) else set()
    warnings = []
    trained_sigma = meta["config"].get("method", {}).get("sigma")
    if trained_sigma is not None and abs(float(trained_sigma) - cfg.smoothing.sigma) > 1e-12:
        warnings.append(f"WARNING: this model was trained with noise sigma={trained_sigma:g} and is being "
                        f"certified at sigma={cfg.smoothing.sigma:g}: expect much lower certified accuracy")
    images, labels = eval_images(ds, [i for i in indices if i not in finished], data.image_size, large=large,
                                 crop_pct=data.crop_pct)
    parent, experiment = (None, None)
    if uri:
        parent, experiment = tracking.model_lineage(cfg.model, uri)
    experiment = cfg.tracking.experiment or experiment or "rayrcm-certify"
    return Prepared(cfg, uri, name, out, cfg.model, local, meta, indices, images, labels, protocol, finished,
                    experiment, parent, warnings)


def _check_protocol(out: Path, protocol: dict[str, Any], name: str) -> None:
    f = out / PROTOCOL_FILE
    if not f.is_file():
        return
    old = json.loads(f.read_text())
    diff = [f"{k} {old.get(k)!r} != {v!r}" for k, v in protocol.items() if old.get(k) != v]
    if diff:
        raise ConfigError("name", name, f"holds results of another protocol ({'; '.join(diff[:3])}); choose another --name")


class _Collector:
    """Sums row counts per image; returns the finished images' records."""

    def __init__(self, p: Prepared) -> None:
        s = p.cfg.smoothing
        self.p, self.mode, self.sigma, self.alpha = p, p.cfg.mode, s.sigma, s.alpha
        roles = {SELECTION: s.n0, ESTIMATION: s.n} if self.mode == "certify" else {PREDICTION: s.n}
        self.rows = [dict(pos=pos, index=idx, role=r.role, chunk=r.chunk, num=r.num)
                     for pos, idx in enumerate(i for i in p.indices if i not in p.finished)
                     for r in plan_rows(idx, roles, s.chunk)]
        self.expected = Counter(r["pos"] for r in self.rows)
        self.todo_index = [i for i in p.indices if i not in p.finished]
        k = int(p.meta["num_classes"])
        self.sums = {pos: {role: np.zeros(k, np.int64) for role in roles} for pos in self.expected}
        self.got: dict[int, set[tuple[int, int]]] = {pos: set() for pos in self.expected}
        self.seconds = {pos: 0.0 for pos in self.expected}
        self.devices: dict[int, set[str]] = {pos: set() for pos in self.expected}
        self.samples = 0

    def add(self, batch: dict[str, np.ndarray]) -> list[dict[str, Any]]:
        done = []
        for pos, role, chunk, num, counts, sec, dev in zip(batch["pos"], batch["role"], batch["chunk"], batch["num"],
                                                            batch["counts"], batch["seconds"], batch["device"]):
            pos, key = int(pos), (int(role), int(chunk))
            if key in self.got[pos]:
                continue  # a retried row delivered twice: identical counts, keep one
            self.got[pos].add(key)
            self.sums[pos][int(role)] += np.asarray(counts, dtype=np.int64)
            self.seconds[pos] += float(sec)
            self.devices[pos].add(str(dev))
            self.samples += int(num)
            if len(self.got[pos]) == self.expected[pos]:
                done.append(self._record(pos))
        return done

    def _record(self, pos: int) -> dict[str, Any]:
        idx, label = self.todo_index[pos], int(self.p.labels[pos])
        rec: dict[str, Any] = {"idx": idx, "label": label, "time": self.seconds[pos], "device": ",".join(sorted(self.devices[pos]))}
        sums = self.sums[pos]
        if self.mode == "certify":
            c = certify_from_counts(sums[SELECTION], sums[ESTIMATION], self.sigma, self.alpha)
            rec.update(predict=c.prediction, radius=c.radius, top_class=c.top_class, n_a=c.n_a, n=c.n, p_a_lower=c.p_a_lower,
                       counts_selection=sums[SELECTION].tolist(), counts_estimation=sums[ESTIMATION].tolist())
        else:
            pr = predict_from_counts(sums[PREDICTION], self.alpha)
            rec.update(predict=pr.prediction, radius=0.0, n_a=pr.n_a, n_b=pr.n_b, p_value=pr.p_value, counts=sums[PREDICTION].tolist())
        rec["correct"] = int(rec["predict"] == label)
        return rec


def _write_part(rows_dir: Path, records: list[dict[str, Any]]) -> None:
    if not records:
        return
    rows_dir.mkdir(parents=True, exist_ok=True)
    name = f"part-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}.parquet"
    tmp = rows_dir / ("." + name + ".tmp")
    pd.DataFrame.from_records(records).to_parquet(tmp, index=False)
    tmp.replace(rows_dir / name)


def _settings(p: Prepared) -> dict[str, Any]:
    s, c = p.cfg.smoothing, p.cfg.compute
    return {"sigma": s.sigma, "seed": s.seed, "block": s.block, "chunk": s.chunk, "batch": c.batch, "precision": c.precision,
            "channels_last": c.channels_last, "use_gpu": c.use_gpu, "cpus_per_worker": c.cpus_per_worker}


def _count_all(p: Prepared, collector: _Collector, on_done, on_progress) -> None:
    """Stream the rows through the actor pool; call ``on_done(records)`` as images finish."""
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    from rayrcm.orchestration.certify_actor import CountActor

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    c = p.cfg.compute
    model_ref = ray.put(p.model_file.read_bytes())
    images_ref = ray.put(p.images)
    ds = ray.data.from_items(collector.rows, override_num_blocks=len(collector.rows))
    ds = ds.map_batches(
        CountActor,
        fn_constructor_kwargs={"model_ref": model_ref, "images_ref": images_ref, "settings": _settings(p)},
        batch_size=1,
        compute=ActorPoolStrategy(size=c.workers),
        num_gpus=c.gpus_per_worker if c.use_gpu else 0,
        num_cpus=c.cpus_per_worker,
    )
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1):
        on_done(collector.add(batch))
        on_progress(False)
    on_progress(True)


def run(cfg: CertifyConfig, *, ray_init: dict[str, Any] | None = None, prepared: Prepared | None = None,
        show_table: bool = True) -> CertifyResult:
    """Certify (or predict) the job's images; resumes when the same job ran before."""
    from rayrcm.orchestration.trainer import ensure_ray

    p = prepared or prepare(cfg)
    cfg = p.cfg
    for w in p.warnings:
        print(f"[rayrcm] {w}", file=sys.stderr, flush=True)
    p.out.mkdir(parents=True, exist_ok=True)
    (p.out / PROTOCOL_FILE).write_text(json.dumps({**p.protocol, "model": p.model_ref}, indent=1, sort_keys=True))
    run_id, logger = None, None
    if p.uri:
        params = {**{f"protocol.{k}": v for k, v in p.protocol.items()}, "model": p.model_ref,
                  **{f"compute.{k}": v for k, v in to_flat_dict(cfg.compute).items()}}
        tags = {"rayrcm.stage": cfg.mode, "rayrcm.model_uri": p.model_ref}
        if p.warnings:
            tags["rayrcm.sigma_mismatch"] = "true"
        run_id = tracking.start_job_run(p.uri, p.experiment, p.name, params, tags=tags, parent_run_id=p.parent_run_id)
        logger = tracking.MetricLogger(p.uri, run_id)
        (p.out / RUN_FILE).write_text(json.dumps({"tracking_uri": p.uri, "run_id": run_id}))
    total, todo = len(p.indices), len(p.indices) - len(p.finished & set(p.indices))
    print(f"[rayrcm] {cfg.mode}: {p.name}: {total} images ({total - todo} already done), sigma={cfg.smoothing.sigma:g}, "
          f"n0={cfg.smoothing.n0}, n={cfg.smoothing.n}, alpha={cfg.smoothing.alpha:g}; results in {p.out}", flush=True)
    tic = time.perf_counter()
    state = {"done": total - todo, "buffer": [], "last": tic}
    collector = _Collector(p)

    def flush() -> None:
        _write_part(p.out / ROWS_DIR, state["buffer"])
        state["buffer"] = []

    def on_done(records: list[dict[str, Any]]) -> None:
        state["buffer"] += records
        state["done"] += len(records)
        if len(state["buffer"]) >= cfg.compute.flush_every:
            flush()

    def on_progress(final: bool) -> None:
        now = time.perf_counter()
        if not final and now - state["last"] < cfg.compute.progress_every_s:
            return
        flush()
        state["last"] = now
        rate = collector.samples / max(now - tic, 1e-9)
        new = state["done"] - (total - todo)
        left = f"~{(now - tic) / new * (total - state['done']):.0f} s left" if new else "starting workers"
        print(f"[rayrcm] {cfg.mode}: {state['done']}/{total} images, {rate:,.0f} samples/s, "
              f"{now - tic:.0f} s elapsed, {left}", flush=True)
        if logger:
            logger.log(state["done"], {"images_done": state["done"], "samples_per_s": rate})

    ok = False
    try:
        if collector.rows:
            ensure_ray(**(ray_init or {}))
            _count_all(p, collector, on_done, on_progress)
        ok = True
    finally:
        flush()
        if not ok and p.uri and run_id:
            tracking.end_run(p.uri, run_id, ok=False)
    return _finish(p, run_id, logger, collector, time.perf_counter() - tic, todo, show_table)


def _finish(p: Prepared, run_id: str | None, logger: Any, collector: _Collector, wall: float, computed: int,
            show_table: bool) -> CertifyResult:
    rows = read_results(p.out)
    if rows["idx"].duplicated().any():
        raise RuntimeError(f"{p.out}: an image was written twice: {rows['idx'][rows['idx'].duplicated()].tolist()[:5]}")
    write_cohen_tsv(rows, p.out / TSV_NAME, p.cfg.mode)
    table = summary_table({p.name: rows})
    metrics = summary_metrics(rows)
    if computed:
        metrics.update(wall_seconds=wall, samples_per_s=collector.samples / max(wall, 1e-9))
    files = write_analysis({p.name: rows}, p.out, title=f"{p.cfg.mode} sigma={p.cfg.smoothing.sigma:g}")
    if logger:
        logger.log(len(rows), metrics)
        for f in [p.out / TSV_NAME, p.out / PROTOCOL_FILE, *files]:
            logger.log_artifact(f)
        logger.log_artifact(p.out / ROWS_DIR, ROWS_DIR)
        tracking.end_run(p.uri, run_id, ok=True)
    print(f"[rayrcm] {p.cfg.mode} done: {len(rows)} images in {p.out}"
          + (f", {computed} computed in {wall:.1f} s" if computed else ", nothing left to compute"), flush=True)
    if show_table:
        print(to_markdown(table), flush=True)
    return CertifyResult(p.name, p.out, run_id, rows, table, metrics, computed)


def write_analysis(results: dict[str, pd.DataFrame], folder: Path, title: str = "",
                   radii: list[float] | None = None) -> list[Path]:
    """``table.md``, ``table.tex`` and ``certified_accuracy.png`` in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    table = summary_table(results, radii)
    (folder / "table.md").write_text(to_markdown(table) + "\n")
    (folder / "table.tex").write_text(to_latex(table) + "\n")
    png = plot_curves(results, folder / "certified_accuracy.png", title=title)
    return [folder / "table.md", folder / "table.tex", png]


def config_from_args(overrides: list[str], base: CertifyConfig | None = None) -> CertifyConfig:
    return update_dataclass(base or CertifyConfig(), parse_dotted(overrides))



RUN_FILE = "mlflow_run.json"


def analyze(paths: list[str], *, radii: list[float] | None = None, out: str | Path | None = None,
            log: bool = True) -> tuple[pd.DataFrame, list[Path]]:
    """Tables and curves over several results (folders or Cohen-format files), written to ``out``
    (default: the first folder's ``analysis/``) and logged to each certification's MLflow run."""
    results: dict[str, pd.DataFrame] = {}
    for path in paths:
        p = Path(path)
        if not p.exists():
            raise ConfigError("results", path, "no such file or folder")
        try:
            df = read_results(p)
        except ValueError as err:
            raise ConfigError("results", path, str(err).split(": ", 1)[-1]) from None
        label = p.name if p.is_dir() else p.stem
        while label in results:
            label += "'"
        results[label] = df
    first = Path(paths[0])
    folder = Path(out) if out else (first if first.is_dir() else first.parent) / "analysis"
    table = summary_table(results, radii)
    files = write_analysis(results, folder, radii=radii)
    print(to_markdown(table), flush=True)
    print(f"[rayrcm] wrote {', '.join(str(f) for f in files)}", flush=True)
    if log:
        for path in paths:
            info = Path(path) / RUN_FILE
            if info.is_file():
                run = json.loads(info.read_text())
                logger = tracking.MetricLogger(run["tracking_uri"], run["run_id"])
                for f in files:
                    logger.log_artifact(f, "analysis")
    return table, files
