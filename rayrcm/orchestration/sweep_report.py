"""A finished sweep's summary: one row per trial (its values, status, reports and best metric), written
as ``sweep_summary.csv``/``.md`` and plotted as ``metric_vs_params.png`` in the sweep folder.
These functions only make files; :mod:`rayrcm.orchestration.tracking` logs them."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any

STATUS_COLORS = {"completed": "tab:blue", "stopped": "tab:orange", "error": "tab:red"}


def trial_table(grid: Any, ends: dict[str, dict[str, Any]], name: str, metric: str, mode: str, keys: list[str]) -> Any:
    """A DataFrame of Tune's results ``grid``, best trial first. ``ends``: the ``end`` events of
    ``trials.jsonl`` by trial id; a trial without one was stopped early (or failed)."""
    import pandas as pd

    pick = max if mode == "max" else min
    rows = []
    for r in grid:
        trial_id = Path(r.path).name.split("-", 1)[0] if r.path else ""  # <trial id>-<values>
        curve = r.metrics_dataframe if r.metrics_dataframe is not None else pd.DataFrame()
        values = curve[metric].dropna().tolist() if metric in curve else []
        end = ends.get(trial_id)
        status = "completed" if end else ("error" if r.error else "stopped")
        best_value = end["metrics"].get("selected_value") if end else None
        if best_value is None and values:
            best_value = pick(values)
        rows.append({"trial": trial_id, **{k: r.config.get(k) for k in keys}, "status": status, "reports": len(values),
                     metric: best_value if best_value is not None else math.nan,
                     "run_id": end["run_id"] if end else None, "job": f"{name}-{trial_id}"})
    table = pd.DataFrame(rows, columns=["trial", *keys, "status", "reports", metric, "run_id", "job"])
    return table.sort_values(metric, ascending=mode == "min", na_position="last").reset_index(drop=True)


def write_table(folder: Path, table: Any, metric: str, keys: list[str]) -> list[Path]:
    """``sweep_summary.csv`` (every column) and ``sweep_summary.md`` (a Markdown table)."""
    folder.mkdir(parents=True, exist_ok=True)
    csv = folder / "sweep_summary.csv"
    table.to_csv(csv, index=False)
    md = folder / "sweep_summary.md"
    cols = ["trial", *keys, "status", "reports", metric]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, row in table.iterrows():
        lines.append("| " + " | ".join(f"{row[c]:.4f}" if isinstance(row[c], float) else str(row[c]) for c in cols) + " |")
    md.write_text("\n".join(lines) + "\n")
    return [csv, md]


def _numeric(column: Any) -> bool:
    return bool(column.map(lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)).all())


def _sane_axes(ax: Any, table: Any, key: str, metric: str) -> None:
    """Axes that read well for a handful of points: the swept values as x ticks, no offset or
    scientific notation, a y range with margins (0..1 for an accuracy)."""
    from matplotlib.ticker import FuncFormatter

    values = table[metric].dropna().astype(float)
    if len(values):
        lo, hi = float(values.min()), float(values.max())
        if 0.0 <= lo and hi <= 1.0:  # an accuracy: its whole range, so that a few points are not blown up
            ax.set_ylim(-0.03, 1.03)
        else:
            pad = max((hi - lo) * 0.1, abs(hi) * 0.05, 1e-3)
            ax.set_ylim(lo - pad, hi + pad)
    ax.yaxis.get_major_formatter().set_useOffset(False)
    if _numeric(table[key]):
        xs = sorted(set(table[key].astype(float)))
        if len(xs) <= 8:
            ax.set_xticks(xs)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
        if len(xs) == 1:
            ax.set_xlim(xs[0] - (abs(xs[0]) or 1) * 0.5, xs[0] + (abs(xs[0]) or 1) * 0.5)
        elif ax.get_xscale() == "linear":
            pad = (xs[-1] - xs[0]) * 0.1
            ax.set_xlim(xs[0] - pad, xs[-1] + pad)
        else:  # log: a margin of a tenth of the decades shown
            span = math.log10(xs[-1] / xs[0]) * 0.1
            ax.set_xlim(xs[0] / 10 ** span, xs[-1] * 10 ** span)


def plot(folder: Path, table: Any, name: str, metric: str, keys: list[str]) -> Path:
    """``metric_vs_params.png``: the metric against each swept key, one colour per trial status."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = max(4.5 * len(keys), 6.0)
    fig, axes = plt.subplots(1, len(keys), figsize=(width, 4.0), squeeze=False, layout="constrained")
    for ax, key in zip(axes[0], keys):
        for status, part in table.groupby("status"):
            x = part[key].astype(float) if _numeric(part[key]) else part[key].astype(str)
            ax.scatter(x, part[metric], label=status, color=STATUS_COLORS.get(status, "gray"), zorder=3)
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        if key.endswith(("lbd", "lr")) and _numeric(table[key]) and (table[key].astype(float) > 0).all() \
                and table[key].astype(float).nunique() > 1:
            ax.set_xscale("log")
        _sane_axes(ax, table, key, metric)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    chars = int(width * 10)  # about what fits across the figure at this font size
    fig.suptitle("\n".join(textwrap.wrap(f"{name}: {metric} (best per trial)", chars)), fontsize=11)
    png = folder / "metric_vs_params.png"
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def write_summary(folder: Path, table: Any, name: str, metric: str, keys: list[str]) -> list[Path]:
    """The summary files of a sweep (CSV, Markdown, plot), returned for logging."""
    return [*write_table(folder, table, metric, keys), plot(folder, table, name, metric, keys)]
