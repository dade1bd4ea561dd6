"""Transfer of a pretrained encoder by SLF, ALF and AFF (the ACL/AIR authors' ``--mode ALL``).

Each mode is one Ray Train run (:func:`rayrcm.orchestration.trainer.fit` with
``method.name=adv_finetune``), a child of one MLflow parent run. Each run ends with the robust
evaluation of its model on the test split (SA, PGD-20 and "AutoAttack (standard)": APGD-CE, APGD-T,
FAB-T and Square, the protocol of ``rayrcm evaluate --suite aa``; :mod:`rayrcm.eval.robust`). The parent
holds the table (``robustness.md``/``.csv``) and one metric per cell (``slf_sa``, ``aff_aa``, ...);
the table is printed. Rerunning the same command resumes: finished modes are not trained again.
"""

from __future__ import annotations

import csv
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from rayrcm.config import ExperimentConfig, to_flat_dict, validate
from rayrcm.orchestration import lineage, tracking

MODES = ("slf", "alf", "aff")


@dataclass
class TransferResult:
    parent_run_id: str | None
    rows: dict[str, dict[str, float]]  # mode -> {"sa", "pgd<k>", "aa", "aa_apgd", "robust_images"} (those measured)
    runs: dict[str, str | None]


def chain_table(rows: dict[str, dict[str, float]], title: str = "") -> str:
    """The chain's table (one row per mode: each mode is its own model), built by the code
    ``rayrcm compare`` prints with (:func:`rayrcm.analysis.paper.paper_table` over each mode's
    result cells)."""
    from rayrcm.analysis.compare import metric_cells
    from rayrcm.analysis.paper import Result, paper_table, to_markdown

    results = [Result(mode, cells["test"], {f"mode:{mode}"}, mode) for mode, row in rows.items()
               if "test" in (cells := metric_cells({f"test_{k}": v for k, v in row.items()}))]
    return (f"**{title}**\n\n" if title else "") + to_markdown(paper_table(results)) + "\n"


def _row(metrics: dict[str, Any], pgd_steps: int) -> dict[str, float]:
    """The mode's robustness metrics (``test_`` dropped), counts' denominator included."""
    keep = ("sa", f"pgd{pgd_steps}", "aa", "aa_apgd", "robust_images")
    return {k: float(metrics[f"test_{k}"]) for k in keep if metrics.get(f"test_{k}") is not None}


def run_all(configs: dict[str, ExperimentConfig], *, name: str, ray_init: dict[str, Any] | None = None) -> TransferResult:
    """Fine-tune with every mode in ``configs`` (``slf``/``alf``/``aff`` -> config), in that order."""
    from rayrcm.orchestration.trainer import fit, prepare

    configs = {m: validate(c) for m, c in configs.items()}
    first = next(iter(configs.values()))
    _, uri = prepare(first)  # checks the tracking server and the pretrained model before any training
    parent = None
    if uri:
        params = {f"{m}.{k}": v for m, c in configs.items() for k, v in to_flat_dict(c).items()
                  if k.startswith(("method.", "optim.", "data.batch_size", "train.epochs", "model.init_from"))}
        parent = tracking.start_job_run(uri, first.tracking.experiment, name, params, tags={"rayrcm.stage": "transfer"})
        print(f"[rayrcm] transfer {name}: MLflow parent run {parent} ({uri})", flush=True)
    rows, runs = {}, {}
    for mode, cfg in configs.items():
        job = f"{name}-{mode}"
        cfg = replace(cfg, train=replace(cfg.train, name=job))
        print(f"[rayrcm] transfer {name}: {mode.upper()} ({job})", flush=True)
        result = fit(cfg, parent_run_id=parent, ray_init=ray_init)
        rows[mode] = _row(result.metrics, cfg.method.eval_pgd_steps)
        runs[mode] = result.run_id
    text = chain_table(rows, f"{name}: test accuracy under L-{first.method.norm} eps {first.method.eps:.4g}")
    print(text, flush=True)
    if uri and parent:
        _log_table(uri, parent, rows, text)
        lineage.finish_run(uri, parent)
    return TransferResult(parent, rows, runs)


def _log_table(uri: str, parent: str, rows: dict[str, dict[str, float]], text: str) -> None:
    logger = tracking.MetricLogger(uri, parent)
    logger.log(0, {f"{m}_{k}": v for m, row in rows.items() for k, v in row.items()})
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "robustness.md").write_text(text)
        with open(Path(d) / "robustness.csv", "w", newline="") as f:
            w = csv.writer(f)
            keys = list(dict.fromkeys(k for row in rows.values() for k in row))
            w.writerow(["mode", *keys])
            for m, row in rows.items():
                w.writerow([m, *(row.get(k, "") for k in keys)])
        logger.log_artifact(Path(d) / "robustness.md")
        logger.log_artifact(Path(d) / "robustness.csv")
