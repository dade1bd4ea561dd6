"""``rayrcm compare``: any evaluations side by side, from their cells in the one result schema
(:data:`rayrcm.analysis.robustness.RESULT_COLUMNS`; pandas only, no Ray, no MLflow).

A result is read from a folder written by ``rayrcm evaluate`` (its ``results.parquet``), a folder
written by ``rayrcm certify`` / ``predict`` (its Parquet rows and ``protocol.json``: certified
accuracy at each radius, :func:`~rayrcm.analysis.robustness.certified_cells`), a
``results.parquet`` file, or the metrics of a fine-tuning run (``<mode>_sa``, ``<mode>_pgd<k>``,
``<mode>_aa``, ...: :func:`metric_cells`). Three tables come out, each only when some result has
its cells (``-``: a result without that column):

* **robustness** (seed 001's shape): one row per result, SA / PGD-k / AutoAttack (standard) /
  APGD-CE+APGD-T (upper bound) / CS-1 / CS-3 / CS-5 (:func:`~rayrcm.analysis.robustness.headline`);
* **shift** (seed 004's shape): clean / C (mean over every corruption and severity) / Sketch /
  Stylized / R (and CIFAR-10.1), for the results that have a shifted set;
* **certified**: certified accuracy at each L2 radius (``rs-sigma<s>`` cells), ``-`` beyond a run's reach.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from rayrcm.analysis.certified import default_radii
from rayrcm.analysis.certified import to_latex as _latex
from rayrcm.analysis.certified import to_markdown as _markdown
from rayrcm.analysis.results import read_results
from rayrcm.analysis.robustness import (
    RESULT_COLUMNS,
    RESULTS_FILE,
    SHIFT_SETS,
    certified_cells,
    certified_rows,
    headline,
    results_table,
    robust_cells,
    shift_row,
)
from rayrcm.result_parts import PROTOCOL_FILE  # as the evaluate and certify jobs write it

if TYPE_CHECKING:
    from rayrcm.analysis.paper import Result

TITLES = {"robustness": "Robustness: SA, attacks, corruptions (CS-s: mean over corruptions at severity s)",
          "shift": "Distribution shift: clean, C (mean over corruptions and severities), shifted sets",
          "certified": "Certified accuracy (randomized smoothing) at L2 radius r"}


def _schema(table: pd.DataFrame) -> pd.DataFrame:
    """A result table in the schema (``radius`` 0 in tables written before it was a column)."""
    table = table.copy()
    if "radius" not in table.columns:
        table["radius"] = 0.0
    missing = [c for c in RESULT_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"not a result table (missing columns {', '.join(missing)})")
    return table[RESULT_COLUMNS].reset_index(drop=True)


def certify_reach(protocol: dict[str, Any]) -> float | None:
    """The largest radius a certification could certify (None for ``predict`` or an unknown protocol);
    for a sequential one, the largest radius it decided (nothing beyond it was measured)."""
    if protocol.get("mode", "certify") != "certify":
        return None
    try:
        if protocol.get("sampling") == "sequential":
            return max(float(r) for r in protocol["radii"])
        from rayrcm.certify.stats import max_certifiable_radius

        return max_certifiable_radius(int(protocol["n"]), float(protocol["alpha"]), float(protocol["sigma"]))
    except (KeyError, ValueError, TypeError):
        return None


def load_result(path: str | Path, radii: list[float] | None = None, label: str = "") -> Result:
    """One evaluation or certification folder (or ``results.parquet``) as a :class:`Result`: its
    result-schema cells, the model it measured (by file hash and reference) and its protocol;
    ``radii``: where certified accuracy is read (default: 0, 0.25, ... up to the run's reach).
    A folder that is neither is a one-line ``ValueError``."""
    from rayrcm.analysis.certified import abstention_rate, average_certified_radius
    from rayrcm.analysis.paper import Result, model_name

    p = Path(path)
    label = label or p.name
    protocol = json.loads((p / PROTOCOL_FILE).read_text()) if (p / PROTOCOL_FILE).is_file() else {}
    keys = {f"sha:{protocol['model_sha256']}"} if protocol.get("model_sha256") else set()
    table = None
    if p.is_file() and p.suffix == ".parquet":
        table = _schema(pd.read_parquet(p))
    elif (p / RESULTS_FILE).is_file():
        table = _schema(pd.read_parquet(p / RESULTS_FILE))
    if table is not None:
        refs = sorted({str(m) for m in table["model"] if str(m)})
        keys = keys or {f"ref:{m}" for m in refs}  # a reference names a model only where no hash does
        ref = str(protocol.get("model") or (refs[0] if len(refs) == 1 else ""))  # the job records it as it was given
        return Result(label, table, keys, model_name(ref), protocol, worst=_worst_evaluated(p))
    if "sigma" in protocol:
        rows = read_results(p)
        if rows.empty:
            raise ValueError(f"{path}: a certification folder with no rows yet")
        if "radius" not in rows.columns:  # predict: an abstaining prediction, no radius
            rows = rows.assign(radius=0.0)
        reach = certify_reach(protocol)
        grid = list(radii) if radii is not None else default_radii([rows], reach)
        if reach is not None:
            grid = [r for r in grid if r <= reach + 1e-12] or [0.0]
        summary = {"abstain": abstention_rate(rows)} if "predict" in rows.columns else {}
        if protocol.get("mode", "certify") == "certify":
            summary = {"ACR": average_certified_radius(rows), **summary}
        ref = str(protocol.get("model") or "")
        return Result(label, certified_cells(rows, protocol, grid), keys, model_name(ref), protocol, summary,
                      worst=_worst_certified(rows, grid, reach))
    raise ValueError(f"{path}: not a result folder (no {RESULTS_FILE}; no certification rows and {PROTOCOL_FILE})")


def _worst_evaluated(p: Path) -> dict[str, float]:
    """An evaluation's worst class per headline column, from its ``per_class.csv`` (none before they were kept)."""
    from rayrcm.analysis.per_class import worst_class_headline

    f = (p if p.is_dir() else p.parent) / "per_class.csv"
    if not f.is_file():
        return {}
    return {k.removeprefix("worst-class "): v for k, v in worst_class_headline(pd.read_csv(f)).items()}


def _worst_certified(rows: pd.DataFrame, grid: list[float], reach: float | None) -> dict[str, float]:
    """A certification's worst class: certified accuracy at each radius (``r=<radius>``) and ACR."""
    from rayrcm.analysis.per_class import per_class_metrics

    m = per_class_metrics(rows, grid, reach)
    out = {f"r={k.rsplit('_', 1)[-1]}": v for k, v in m.items() if k.startswith("worst_class_certified_acc_")}
    if "worst_class_acr" in m:
        out["ACR"] = m["worst_class_acr"]
    return out


def read_result(path: str | Path, radii: list[float] | None = None) -> pd.DataFrame:
    """The result-schema cells of one evaluation or certification folder (:func:`load_result`)."""
    return load_result(path, radii).cells


_METRIC = re.compile(r"^(?P<prefix>.+)_(?P<name>sa|pgd\d+|aa|aa_apgd|robust_images)$")


def metric_cells(metrics: dict[str, float]) -> dict[str, pd.DataFrame]:
    """A fine-tuning run's robustness metrics (``<prefix>_sa``, ``<prefix>_pgd<k>``, ``<prefix>_aa_apgd``,
    ``<prefix>_aa``, ``<prefix>_robust_images``, :func:`rayrcm.eval.robust.robust_metrics`) -> one
    result table per prefix (``slf``, ``aff``, ``test``...)."""
    found: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        m = _METRIC.match(key)
        if m:
            found.setdefault(m["prefix"], {})[m["name"]] = float(value)
    out = {}
    for prefix, got in found.items():
        pgd = [k for k in got if k.startswith("pgd")]
        if "sa" not in got or not pgd:
            continue
        n = int(round(got.get("robust_images", 0))) or 1
        counts = [n] + [int(round(got.get(k, 0.0) * n)) for k in ("sa", pgd[0], "aa_apgd", "aa")]
        out[prefix] = robust_cells(counts, pgd_steps=int(pgd[0][3:]), autoattack="aa_apgd" in got,
                                   aa_version="standard" if "aa" in got else "apgd", model=prefix)
    return out


_FIRST = ("SA", "PGD", "AutoAttack", "APGD", "CS-", "clean", "C (generated)", "C", *SHIFT_SETS.values())


def _order(col: str) -> tuple[int, float, str]:
    """Columns in the papers' order: SA, PGD, AA, CS-1/3/5; clean, C, Sketch, Stylized, R; radii."""
    if col in _FIRST[5:]:
        return 5 + _FIRST[5:].index(col), 0.0, col
    for rank, start in enumerate(_FIRST[:5]):
        if col.startswith(start):
            sev = float(re.sub(r"\D", "", col.split(" ")[0]) or 0) if start == "CS-" else 0.0
            return rank, sev, col
    try:
        return 50, float(col), col
    except ValueError:
        return 40, 0.0, col


def compare_tables(results: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """``{"robustness" | "shift" | "certified": table}`` (rows: the results' labels), each present
    only when some result has its cells; NaN where a result lacks a column."""
    parts: dict[str, dict[str, dict[str, float]]] = {"robustness": {}, "shift": {}, "certified": {}}
    for label, table in results.items():
        table = _schema(table)
        head = headline(table)
        if head:
            parts["robustness"][label] = head
        if table["set"].isin(list(SHIFT_SETS)).any():
            parts["shift"][label] = shift_row(table)
        parts["certified"].update(certified_rows(label, table))
    out = {}
    for name, rows in parts.items():
        if rows:
            t = pd.DataFrame.from_dict(rows, orient="index")
            out[name] = t[sorted(t.columns, key=_order)]
    return out


def to_markdown(tables: dict[str, pd.DataFrame]) -> str:
    return "\n\n".join(f"**{TITLES[name]}**\n\n{_markdown(t)}" for name, t in tables.items())


def to_latex(tables: dict[str, pd.DataFrame]) -> str:
    return "\n\n".join(f"% {TITLES[name]}\n{_latex(t)}" for name, t in tables.items())


__all__ = ["TITLES", "certify_reach", "compare_tables", "load_result", "metric_cells", "read_result", "results_table", "shift_row",
           "to_latex", "to_markdown"]
