"""Everything of an evaluation job that can fail on bad input, before any Ray work: the config and
its validation, the plugins, the model (it must rebuild and predict classes), the dataset and its
image list, the suite's cells and their shards, the released or shifted files, the job's name and
folder, and the protocol (a rerun of a name with another protocol is refused). The job itself is
:mod:`rayrcm.orchestration.evaluate_job`."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from rayrcm.analysis.robustness import NONE
from rayrcm.errors import ConfigError
from rayrcm.orchestration import tracking
from rayrcm.overrides import check_finite, parse_dotted, update_dataclass
from rayrcm.sections import TrackingConfig, check_job_name, default_storage

PROTOCOL_FILE = "protocol.json"  # the protocol of a results folder (compared on resume)
RUN_FILE = "mlflow_run.json"  # the MLflow run of a results folder
ROWS_DIR = "rows"  # finished shards, part-*.parquet
ROW_COLUMNS = ["key", "model", "set", "corruption", "severity", "generated", "attack", "shard", "images", "correct", "seconds", "device"]
SUITES = ("clean", "corruptions", "pgd", "aa-apgd", "aa", "shift")
NOT_BUILT: dict[str, str] = {}  # suite part -> why it is refused (none today)
SPLITS = ("test", "val")
# PGD's start per image index, AutoAttack's draws per batch's first image index (rayrcm.eval.robust): a
# folder written when the attacks were seeded by shard key lacks it, and is refused on resume
ATTACK_SEEDING = "image-index"


@dataclass(frozen=True)
class EvaluateConfig:
    """One evaluation job. Every key is a ``--set KEY=VALUE`` of ``rayrcm evaluate``."""

    model: str = ""  # models:/name@alias, models:/name/3, runs:/<id>/model, a run id, or a model.pt path
    suite: tuple[str, ...] = ("clean", "corruptions")
    severities: tuple[int, ...] = (1, 3, 5)
    corruptions: tuple[str, ...] = ()  # () = every generated corruption (or every file of c_path)
    c_path: str = ""  # a released CIFAR-10-C / CIFAR-100-C folder (ImageNet-C for imagefolder); "" = generate
    shift_path: str = ""  # the CIFAR-10.1 folder of the ``shift`` part (= shifts cifar10.1=PATH)
    shifts: tuple[str, ...] = ()  # NAME=PATH of the ``shift`` part, NAME: cifar10.1, sketch, r, stylized
    class_list: str = ""  # the model's classes (one wnid per line, output order); "" = the dataset's class folders
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


def shift_specs(cfg: EvaluateConfig) -> dict[str, str]:
    """The ``shift`` part's sets, ``{set name: path}`` (``shift_path`` is ``cifar10.1``); one-line errors."""
    from rayrcm.data.shift import parse_shift

    out = {"cifar10.1": cfg.shift_path} if cfg.shift_path else {}
    for item in cfg.shifts:
        name, path = parse_shift(item)
        _check(name not in out, "shift", item, f"names {name} twice (--shift-path is cifar10.1)")
        out[name] = path
    return out


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
    _check("shift" not in cfg.suite or bool(shift_specs(cfg)), "suite", "shift",
           "needs --shift-path: a CIFAR-10.1 folder (cifar10.1_v6_data.npy, cifar10.1_v6_labels.npy), or "
           "--shift NAME=PATH (NAME: cifar10.1, sketch, r, stylized)")
    _check("shift" in cfg.suite or not (cfg.shifts or cfg.shift_path), "shifts", ",".join(cfg.shifts) or cfg.shift_path,
           "names shifted sets but --suite has no shift part")
    _check(cfg.split in SPLITS, "split", cfg.split, f"choose one of: {', '.join(SPLITS)}")
    _check(cfg.skip >= 1, "skip", cfg.skip, "must be >= 1")
    _check(cfg.max_images >= 0, "max_images", cfg.max_images, "must be >= 0 (0 = all)")
    _check(0 <= cfg.seed < 2**63, "seed", cfg.seed, "must be >= 0 and < 2^63 (a 64-bit seed)")
    _check(not Path(cfg.out_dir).expanduser().is_file(), "out_dir", cfg.out_dir, "is a file; give a folder")
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


@dataclass(frozen=True)
class Cell:
    """One evaluated cell of the result schema and where its images come from."""

    set: str
    corruption: str
    severity: int
    generated: bool
    attack: str
    source: str  # clean | generated | released | cifar10.1 | folder | imagenet-c (evaluate_actor.shard_images)
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


def _cells(cfg: EvaluateConfig, dataset: str, num_classes: int, large: bool = False, classes: tuple[str, ...] = (),
           shifted: dict[str, dict[str, Any]] | None = None) -> list[Cell]:
    """The suite's cells; ``shifted`` collects each read set's path and how many classes remain."""
    from rayrcm.data.corruptions import check_corruption, corruption_names, generated_set_name

    out: list[Cell] = []
    for part in cfg.suite:
        if part == "clean":
            out.append(Cell(dataset, NONE, 0, False, NONE, "clean"))
        elif part == "pgd":
            out.append(Cell(dataset, NONE, 0, False, f"pgd{cfg.pgd_steps}", "clean"))
        elif part in ("aa", "aa-apgd"):
            out.append(Cell(dataset, NONE, 0, False, part, "clean"))
        elif part == "corruptions" and cfg.c_path and large:
            out += _imagenet_c_cells(cfg, classes, {} if shifted is None else shifted)
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
            out += _shift_cells(cfg, num_classes, classes, {} if shifted is None else shifted)
    return out


def _where(path: str) -> str:
    return str(Path(path).expanduser().resolve())


def _shift_cells(cfg: EvaluateConfig, num_classes: int, classes: tuple[str, ...],
                 shifted: dict[str, dict[str, Any]]) -> list[Cell]:
    from rayrcm.data.shift import read_cifar10_1, read_shift_folder

    out = []
    for name, path in shift_specs(cfg).items():
        if name == "cifar10.1":
            if num_classes != 10:
                raise ConfigError("suite", "shift",
                                  f"CIFAR-10.1 has CIFAR-10's 10 classes; the model has {num_classes}")
            n = len(read_cifar10_1(path))
            shifted[name] = {"path": _where(path), "classes": 10, "of": 10, "masked": False, "images": n}
            out.append(Cell(name, NONE, 0, False, NONE, "cifar10.1", n))
        else:
            shifted[name] = read_shift_folder(name, path, classes=classes).record(_where(path))
            out.append(Cell(name, NONE, 0, False, NONE, "folder", shifted[name]["images"]))
    return out


def _imagenet_c_cells(cfg: EvaluateConfig, classes: tuple[str, ...], shifted: dict[str, dict[str, Any]]) -> list[Cell]:
    """Released ImageNet-C (``<corruption>/<severity>/<wnid>/``) restricted to the model's classes."""
    from rayrcm.data.shift import imagenet_c_corruptions, read_imagenet_c

    names = list(cfg.corruptions) or imagenet_c_corruptions(cfg.c_path)
    if not names:
        raise ConfigError("c_path", cfg.c_path, "holds no ImageNet-C <corruption>/<severity>/<wnid>/ folder")
    out = []
    for c in names:
        for s in cfg.severities:
            info = read_imagenet_c(cfg.c_path, c, s, classes=classes).record(_where(cfg.c_path))
            old = shifted.setdefault("imagenet-c", info)  # the fewest classes left by any corruption and severity
            old["classes"], old["images"] = min(old["classes"], info["classes"]), min(old["images"], info["images"])
            out.append(Cell("imagenet-c", c, s, False, NONE, "imagenet-c", info["images"]))
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
    parts = sorted((out / ROWS_DIR).glob("part-*.parquet"))
    if not parts:
        return pd.DataFrame(columns=ROW_COLUMNS)
    return pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)


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
    from rayrcm.orchestration.certify_prepare import data_config, file_sha256, load_classifier_file
    from rayrcm.plugins import load_plugins

    cfg = validate(cfg)
    load_plugins(cfg.plugins, key="plugins")
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
    indices = _select(len(ds), cfg.skip, cfg.max_images)  # type: ignore[arg-type]
    if not indices:
        raise ConfigError("max_images", cfg.max_images, "selects no image")
    shifted: dict[str, dict[str, Any]] = {}
    classes = _check_folders(cfg, ds, num_classes, large)
    cells = _cells(cfg, data.name, num_classes, large, classes, shifted)
    _check_released(cfg, cells, indices, num_classes)
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
    settings = _settings(cfg, data, num_classes, large, classes, shifted)
    return Prepared(cfg, uri, name, out, cfg.model, local, meta, data.name, indices, images, labels, cells, rows,
                    finished, protocol, experiment, parent, settings)


def _settings(cfg: EvaluateConfig, data: Any, num_classes: int, large: bool, classes: tuple[str, ...],
              shifted: dict[str, dict[str, Any]]) -> Any:
    from rayrcm.data.shift import FOLDER_SETS
    from rayrcm.orchestration.evaluate_actor import ShardSettings

    return ShardSettings(seed=cfg.seed, batch=cfg.batch, eps=cfg.eps, step_size=cfg.step_size,
                         pgd_steps=cfg.pgd_steps, aa_iters=cfg.aa_iters, aa_targets=cfg.aa_targets,
                         aa_queries=cfg.aa_queries, image_size=data.image_size, num_classes=num_classes,
                         c_path=_where(cfg.c_path) if cfg.c_path else "",
                         shift_path=shifted["cifar10.1"]["path"] if "cifar10.1" in shifted else "",
                         shift_sets=tuple((n, v["path"]) for n, v in shifted.items() if n in FOLDER_SETS),
                         classes=classes, large=large, crop_pct=data.crop_pct,
                         use_gpu=cfg.use_gpu, cpus_per_worker=cfg.cpus_per_worker, plugins=cfg.plugins)
