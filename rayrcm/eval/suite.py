"""What ``rayrcm evaluate`` measures, before any Ray or MLflow work (pure: no Ray, no MLflow): the
job's config and its one-line validation, the suites, and the result cells and shards a job is made
of (:class:`Cell`: one cell of the result schema and where its images come from). The Ray layer
(:mod:`rayrcm.orchestration.evaluate_prepare`) resolves the model and the data and runs the shards."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rayrcm.analysis.robustness import NONE
from rayrcm.errors import ConfigError
from rayrcm.overrides import check_finite, parse_dotted, update_dataclass
from rayrcm.sections import TrackingConfig, check_job_name, default_storage

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




def build_cells(cfg: EvaluateConfig, dataset: str, num_classes: int, large: bool = False, classes: tuple[str, ...] = (),
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


def resolved_path(path: str) -> str:
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
            shifted[name] = {"path": resolved_path(path), "classes": 10, "of": 10, "masked": False, "images": n}
            out.append(Cell(name, NONE, 0, False, NONE, "cifar10.1", n))
        else:
            shifted[name] = read_shift_folder(name, path, classes=classes).record(resolved_path(path))
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
            info: dict[str, Any] = read_imagenet_c(cfg.c_path, c, s, classes=classes).record(resolved_path(cfg.c_path))
            old = shifted.setdefault("imagenet-c", info)  # the fewest classes left by any corruption and severity
            old["classes"], old["images"] = min(old["classes"], info["classes"]), min(old["images"], info["images"])
            out.append(Cell("imagenet-c", c, s, False, NONE, "imagenet-c", info["images"]))
    return out


def check_released(cfg: EvaluateConfig, cells: list[Cell], indices: list[int], num_classes: int) -> None:
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


def select_images(n: int, skip: int, max_images: int) -> list[int]:
    indices = list(range(0, n, skip))
    return indices[:max_images] if max_images else indices


def plan_shards(cells: list[Cell], indices: list[int], size: int, model_ref: str, skip: int = 1,
            max_images: int = 0) -> list[dict[str, Any]]:
    """Every row of work: a cell's image list (the job's, or its own set's) cut into ``size`` positions."""
    rows = []
    for cell in cells:
        own = select_images(cell.size, skip, max_images) if cell.size else indices
        for shard, start in enumerate(range(0, len(own), size)):
            stop = min(start + size, len(own))
            key = f"{cell.set}|{cell.corruption}|{cell.severity}|{cell.attack}|{shard}"
            fields = {k: v for k, v in asdict(cell).items() if k != "size"}
            rows.append({"key": key, "model": model_ref, **fields, "shard": shard, "start": start, "stop": stop,
                         "index": list(own[start:stop])})
    return rows


__all__ = ["ATTACK_SEEDING", "NOT_BUILT", "SPLITS", "SUITES", "Cell", "EvaluateConfig", "build_cells", "check_released",
           "config_from_args", "plan_shards", "resolved_path", "select_images", "shift_specs", "validate"]
