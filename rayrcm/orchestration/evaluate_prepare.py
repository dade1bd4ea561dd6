"""Everything of an evaluation job that can fail on bad input, before any Ray work: the model (it
must rebuild and predict classes), the dataset and its image list, the released or shifted files,
the job's name and folder, and the protocol (a rerun of a name with another protocol is refused).
The config, its validation, the suites, cells and shards are pure: :mod:`rayrcm.eval.suite`. The job
itself is :mod:`rayrcm.orchestration.evaluate_job`."""

from __future__ import annotations

import json
from collections.abc import Sized
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pandas as pd

from rayrcm.errors import ConfigError
from rayrcm.eval.suite import (
    ATTACK_SEEDING,
    Cell,
    EvaluateConfig,
    build_cells,
    check_released,
    plan_shards,
    resolved_path,
    select_images,
    shift_specs,
    validate,
)
from rayrcm.orchestration import tracking
from rayrcm.orchestration.results_inputs import data_config, load_classifier_file
from rayrcm.result_parts import PROTOCOL_FILE, ROWS_DIR, RUN_FILE, read_parts
from rayrcm.sections import check_job_name

__all__ = ["PROTOCOL_FILE", "ROWS_DIR", "ROW_COLUMNS", "RUN_FILE", "Prepared", "prepare", "read_rows"]

ROW_COLUMNS = ["key", "model", "set", "corruption", "severity", "generated", "attack", "shard", "images", "correct", "seconds", "device"]


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
    settings: Any  # rayrcm.eval.suites.base.ShardSettings

    @property
    def todo(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["key"] not in self.finished]


def _check_protocol(out: Path, protocol: dict[str, Any], name: str) -> None:
    from rayrcm.certify.protocol import protocol_diff

    f = out / PROTOCOL_FILE
    if not f.is_file():
        return
    old = json.loads(f.read_text())
    old.pop("model", None)
    old.setdefault("aa_queries", EvaluateConfig.aa_queries)  # recorded before Square ran: its default
    sets = old.pop("shift_sets", {})  # a set read from another folder is refused; new sets add shards
    other = [f"{n} was read from {v.get('path')}" for n, v in sets.items()
             if n in protocol["shift_sets"] and protocol["shift_sets"][n].get("path") != v.get("path")]
    if other:
        raise ConfigError("name", name, f"holds results of another shifted set ({'; '.join(other[:2])}); "
                          "choose another --name")
    protocol["shift_sets"] = {**sets, **protocol["shift_sets"]}
    diff = protocol_diff(old, {k: v for k, v in protocol.items() if k != "shift_sets"})
    if diff:
        raise ConfigError("name", name,
                          f"holds results of another protocol ({'; '.join(diff[:3])}); choose another --name")


def read_rows(out: Path) -> pd.DataFrame:
    """Every shard row written under ``out/rows`` (an empty frame with the row columns when none)."""
    return read_parts(out, ROW_COLUMNS)


def _check_folders(cfg: EvaluateConfig, ds: Any, num_classes: int, large: bool) -> tuple[str, ...]:
    """Every released or shifted folder there (one line each, before Ray); the model's class list
    when a folder set (ImageNet-C, Sketch, R, Stylized) is read: ``class_list``, else the dataset's."""
    from rayrcm.data.shift import FOLDER_SETS, model_classes, parse_shift

    what = ("ImageNet-C: <corruption>/<severity>/<wnid>/ folders" if large else
            "a released CIFAR-10-C / CIFAR-100-C folder of <corruption>.npy files and labels.npy")
    if cfg.c_path and not Path(cfg.c_path).expanduser().is_dir():
        raise ConfigError("c_path", cfg.c_path, f"no such folder ({what}; nothing is downloaded)")
    specs = shift_specs(cfg) if "shift" in cfg.suite else {}
    given = {parse_shift(i)[0]: i for i in cfg.shifts}
    for name, path in specs.items():
        if not Path(path).expanduser().is_dir():
            key, value = ("shift", given[name]) if name in given else ("shift_path", path)
            raise ConfigError(key, value, "no such folder (nothing is downloaded)")
    if not (any(n in FOLDER_SETS for n in specs) or (large and cfg.c_path and "corruptions" in cfg.suite)):
        return ()
    return model_classes(ds, cfg.class_list, num_classes)


def prepare(cfg: EvaluateConfig) -> Prepared:
    """Everything that can fail on bad input, before any Ray work."""
    import hashlib

    from rayrcm.data import DATASETS
    from rayrcm.data.datasets import eval_images, eval_split
    from rayrcm.models.denoisers import file_sha256
    from rayrcm.plugins import load_plugins

    load_plugins(cfg.plugins, key="plugins")  # first: a suite, export kind or dataset of the user's is then valid
    cfg = validate(cfg)
    uri = None
    if cfg.tracking.enabled:
        uri = tracking.normalize_uri(cfg.tracking.uri)
        tracking.check_reachable(uri)
    local, meta = load_classifier_file(cfg.model, uri)
    data = data_config(cfg.dataset, cfg.data_path, meta)
    if data.name not in DATASETS:
        raise ConfigError("dataset", data.name, f"unknown dataset; choose one of: {', '.join(DATASETS.names())}")
    DATASETS.get(data.name).check_path(data.path)
    ds, num_classes, large = eval_split(data, cfg.split)
    if num_classes != meta["num_classes"]:
        raise ConfigError("model", cfg.model, f"has {meta['num_classes']} classes but dataset {data.name} has {num_classes}")
    indices = select_images(len(cast(Sized, ds)), cfg.skip, cfg.max_images)
    if not indices:
        raise ConfigError("max_images", cfg.max_images, "selects no image")
    shifted: dict[str, dict[str, Any]] = {}
    classes = _check_folders(cfg, ds, num_classes, large)
    cells = build_cells(cfg, data.name, num_classes, large, classes, shifted)
    check_released(cfg, cells, indices, num_classes)
    sha = file_sha256(local)
    name = cfg.name or f"evaluate-{data.name}-{cfg.split}-{sha[:8]}-seed{cfg.seed}"
    check_job_name("name" if cfg.name else "dataset", name)
    out = Path(cfg.out_dir).expanduser().resolve() / name
    protocol = {
        "model_sha256": sha, "dataset": data.name, "split": cfg.split, "num_classes": num_classes,
        "image_size": data.image_size, "crop_pct": data.crop_pct if large else None, "images": len(indices),
        "indices_sha1": hashlib.sha1(",".join(map(str, indices)).encode()).hexdigest(), "seed": cfg.seed,
        "shard_size": cfg.shard_size, "batch": cfg.batch, "norm": "linf", "eps": cfg.eps, "step_size": cfg.step_size,
        "pgd_steps": cfg.pgd_steps, "aa_iters": cfg.aa_iters, "aa_targets": cfg.aa_targets,
        "aa_queries": cfg.aa_queries, "attack_seeding": ATTACK_SEEDING, "shift_sets": shifted,
    }
    _check_protocol(out, protocol, name)
    rows = plan_shards(cells, indices, cfg.shard_size, cfg.model, cfg.skip, cfg.max_images)
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
    settings = _settings(cfg, data, num_classes, large, classes, shifted)
    return Prepared(cfg, uri, name, out, cfg.model, local, meta, data.name, indices, images, labels, cells, rows,
                    finished, protocol, experiment, parent, settings)


def _settings(cfg: EvaluateConfig, data: Any, num_classes: int, large: bool, classes: tuple[str, ...],
              shifted: dict[str, dict[str, Any]]) -> Any:
    from rayrcm.data.shift import FOLDER_SETS
    from rayrcm.eval.suites.base import ShardSettings

    return ShardSettings(seed=cfg.seed, batch=cfg.batch, eps=cfg.eps, step_size=cfg.step_size,
                         pgd_steps=cfg.pgd_steps, aa_iters=cfg.aa_iters, aa_targets=cfg.aa_targets,
                         aa_queries=cfg.aa_queries, image_size=data.image_size, num_classes=num_classes,
                         c_path=resolved_path(cfg.c_path) if cfg.c_path else "",
                         shift_path=shifted["cifar10.1"]["path"] if "cifar10.1" in shifted else "",
                         shift_sets=tuple((n, v["path"]) for n, v in shifted.items() if n in FOLDER_SETS),
                         classes=classes, large=large, crop_pct=data.crop_pct,
                         use_gpu=cfg.use_gpu, cpus_per_worker=cfg.cpus_per_worker, plugins=cfg.plugins)
