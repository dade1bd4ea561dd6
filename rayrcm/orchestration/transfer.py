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
from rayrcm.orchestration import tracking

MODES = ("slf", "alf", "aff")
COLUMNS = (("sa", "SA"), ("pgd20", "PGD-20"), ("aa", "AutoAttack (standard)"))


@dataclass
class TransferResult:
    parent_run_id: str | None
    rows: dict[str, dict[str, float]]  # mode -> {"sa": .., "pgd20": .., "aa": ..}
    runs: dict[str, str | None]


def table_markdown(rows: dict[str, dict[str, float]], title: str = "") -> str:
    lines = ([f"**{title}**", ""] if title else []) + ["| mode | " + " | ".join(h for _, h in COLUMNS) + " |",
                                                       "| --- |" + " ---: |" * len(COLUMNS)]
    for mode, row in rows.items():
        cells = [f"{100 * row[k]:.2f}" if k in row else "-" for k, _ in COLUMNS]
        lines.append(f"| {mode.upper()} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _row(metrics: dict[str, Any], pgd_steps: int) -> dict[str, float]:
    out = {"sa": metrics.get("test_sa"), "pgd20": metrics.get(f"test_pgd{pgd_steps}"), "aa": metrics.get("test_aa")}
    return {k: float(v) for k, v in out.items() if v is not None}


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
    text = table_markdown(rows, f"{name}: test accuracy (%) under L-{first.method.norm} eps {first.method.eps:.4g}")
    print(text, flush=True)
    if uri and parent:
        _log_table(uri, parent, rows, text)
        tracking.end_run(uri, parent, ok=True)
    return TransferResult(parent, rows, runs)


def _log_table(uri: str, parent: str, rows: dict[str, dict[str, float]], text: str) -> None:
    logger = tracking.MetricLogger(uri, parent)
    logger.log(0, {f"{m}_{k}": v for m, row in rows.items() for k, v in row.items()})
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "robustness.md").write_text(text)
        with open(Path(d) / "robustness.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["mode", *(k for k, _ in COLUMNS)])
            for m, row in rows.items():
                w.writerow([m, *(row.get(k, "") for k, _ in COLUMNS)])
        logger.log_artifact(Path(d) / "robustness.md")
        logger.log_artifact(Path(d) / "robustness.csv")
