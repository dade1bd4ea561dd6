"""What ``rayrcm evaluate`` measures, before any Ray or MLflow work (pure: no Ray, no MLflow): the
job's config (:class:`EvaluateConfig`, :mod:`rayrcm.eval.suites.config`) and its one-line
validation, the suites (the registry :data:`rayrcm.eval.suites.EVALUATE_SUITES`: each knows its
cells and how a shard of it is computed), and the result cells and shards a job is made of
(:class:`Cell`: one cell of the result schema and where its images come from). The Ray layer
(:mod:`rayrcm.orchestration.evaluate_prepare`) resolves the model and the data and runs the shards."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from rayrcm.eval.suites import EVALUATE_SUITES
from rayrcm.eval.suites.base import Cell, CellContext, resolved_path
from rayrcm.eval.suites.config import EvaluateConfig, config_from_args
from rayrcm.eval.suites.config import check as _check
from rayrcm.eval.suites.shift import shift_specs
from rayrcm.overrides import check_finite
from rayrcm.sections import check_job_name

SUITES = EVALUATE_SUITES.ordered()  # ("clean", "corruptions", "pgd", "aa-apgd", "aa", "shift")
NOT_BUILT: dict[str, str] = {}  # suite part -> why it is refused (none today)
SPLITS = ("test", "val")
# PGD's start per image index, AutoAttack's draws per batch's first image index (rayrcm.eval.robust): a
# folder written when the attacks were seeded by shard key lacks it, and is refused on resume
ATTACK_SEEDING = "image-index"


def validate(cfg: EvaluateConfig) -> EvaluateConfig:
    """Every value that can be checked without the model or the data; one-line errors."""
    check_finite(cfg)
    _check(bool(cfg.model), "model", cfg.model, "give a registry URI, a run id or a model.pt path")
    _check(bool(cfg.suite), "suite", ",".join(cfg.suite), f"name at least one of: {', '.join(SUITES[:4])}")
    for s in cfg.suite:
        _check(s in EVALUATE_SUITES, "suite", s, f"choose from: {', '.join(EVALUATE_SUITES.ordered())}")
        _check(s not in NOT_BUILT, "suite", s, NOT_BUILT.get(s, ""))
    _check(len(set(cfg.suite)) == len(cfg.suite), "suite", ",".join(cfg.suite), "names a part twice")
    _check(bool(cfg.severities) and all(1 <= s <= 5 for s in cfg.severities), "severities",
           ",".join(map(str, cfg.severities)), "integers from 1 to 5, comma separated")
    _check(len(set(cfg.severities)) == len(cfg.severities), "severities", ",".join(map(str, cfg.severities)),
           "names a severity twice")
    _check(len(set(cfg.corruptions)) == len(cfg.corruptions), "corruptions", ",".join(cfg.corruptions),
           "names a corruption twice")
    for part in cfg.suite:  # each part's own checks (corruption names, shifted sets)
        EVALUATE_SUITES.get(part).check(cfg)
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
    _check(cfg.pgd_steps >= 1 and cfg.aa_iters >= 1 and cfg.aa_targets >= 1, "pgd_steps",
           (cfg.pgd_steps, cfg.aa_iters, cfg.aa_targets), "steps, iterations and targets must be >= 1")
    cfg.budget.validate("", steps="pgd_steps")  # step_size (eps and steps are held tighter above)
    _check(cfg.aa_queries >= 1, "aa_queries", cfg.aa_queries, "must be >= 1")
    _check(cfg.workers >= 1, "workers", cfg.workers, "must be >= 1")
    _check(cfg.gpus_per_worker > 0 and cfg.cpus_per_worker > 0, "cpus_per_worker",
           (cfg.gpus_per_worker, cfg.cpus_per_worker), "resources per worker must be > 0")
    _check(cfg.flush_every >= 1, "flush_every", cfg.flush_every, "must be >= 1")
    _check(all(p.strip() for p in cfg.plugins), "plugins", cfg.plugins, "give module names or .py files")
    if cfg.name:
        check_job_name("name", cfg.name)
    return cfg


def build_cells(cfg: EvaluateConfig, dataset: str, num_classes: int, large: bool = False, classes: tuple[str, ...] = (),
                shifted: dict[str, dict[str, Any]] | None = None) -> list[Cell]:
    """The suite's cells, part by part (each part's suite builds its own); ``shifted`` collects each
    read set's path and how many classes remain."""
    ctx = CellContext(cfg, dataset, num_classes, large, classes, {} if shifted is None else shifted)
    return [cell for part in cfg.suite for cell in EVALUATE_SUITES.get(part).cells(ctx)]


def check_released(cfg: EvaluateConfig, cells: list[Cell], indices: list[int], num_classes: int) -> None:
    """Every file the cells read there, readable, and long enough for the job's images (one line each)."""
    for part in cfg.suite:
        EVALUATE_SUITES.get(part).check_cells(cfg, cells, indices, num_classes)


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
