"""Certified accuracy, average certified radius, tables and curves from certification rows.

* certified accuracy at radius r: the fraction of images with ``correct == 1`` and
  ``radius >= r`` (Cohen et al. 2019, ``analyze.py``); at r = 0 it is the smoothed classifier's
  accuracy, abstentions counting as errors;
* ACR (average certified radius, Zhai et al., MACER, ICLR 2020): ``mean(radius * correct)`` over
  all images, abstentions and errors contributing 0;
* abstention rate: the fraction with ``predict == -1``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

STANDARD_RADII = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0)


def default_radii(frames: Sequence[pd.DataFrame]) -> list[float]:
    """0 to 2.0 in steps of 0.25, extended (up to 4.0) to cover the largest certified radius."""
    top = max([float(df["radius"].max()) for df in frames if len(df)] + [0.0])
    stop = min(4.0, max(2.0, np.ceil(top * 4) / 4))
    return [round(r, 2) for r in np.arange(0.0, stop + 1e-9, 0.25)]


def certified_accuracy(df: pd.DataFrame, radii: Sequence[float]) -> np.ndarray:
    correct = df["correct"].to_numpy().astype(bool)
    radius = df["radius"].to_numpy(dtype=float)
    return np.array([float(np.mean(correct & (radius >= r))) if len(df) else 0.0 for r in radii])


def average_certified_radius(df: pd.DataFrame) -> float:
    return float(np.mean(df["radius"].to_numpy(dtype=float) * df["correct"].to_numpy())) if len(df) else 0.0


def abstention_rate(df: pd.DataFrame) -> float:
    return float(np.mean(df["predict"].to_numpy() == -1)) if len(df) else 0.0


def summary_table(results: Mapping[str, pd.DataFrame], radii: Sequence[float] | None = None) -> pd.DataFrame:
    """One row per run: certified accuracy at each radius, ACR, abstention rate, image count."""
    radii = list(radii) if radii is not None else default_radii(list(results.values()))
    rows = {}
    for name, df in results.items():
        acc = certified_accuracy(df, radii)
        rows[name] = {**{f"{r:.2f}": a for r, a in zip(radii, acc)}, "ACR": average_certified_radius(df),
                      "abstain": abstention_rate(df), "images": len(df)}
    return pd.DataFrame.from_dict(rows, orient="index")


def summary_metrics(df: pd.DataFrame, radii: Sequence[float] | None = None) -> dict[str, float]:
    """Flat metrics for MLflow: ``certified_acc_0.50``, ``acr``, ``abstain_rate``."""
    radii = list(radii) if radii is not None else default_radii([df])
    out = {f"certified_acc_{r:.2f}": float(a) for r, a in zip(radii, certified_accuracy(df, radii))}
    out.update(acr=average_certified_radius(df), abstain_rate=abstention_rate(df), images=float(len(df)))
    return out


def _fmt(col: str, v: object) -> str:
    if col == "images":
        return str(int(v))  # type: ignore[call-overload]
    return f"{float(v):.3f}"  # type: ignore[arg-type]


def to_markdown(table: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (radii as column headers, as in the papers)."""
    head = "| run | " + " | ".join(table.columns) + " |"
    rule = "|---|" + "---:|" * len(table.columns)
    body = ["| " + str(name) + " | " + " | ".join(_fmt(c, row[c]) for c in table.columns) + " |" for name, row in table.iterrows()]
    return "\n".join([head, rule, *body])


def to_latex(table: pd.DataFrame) -> str:
    """A booktabs LaTeX tabular; accuracies in percent as the papers print them."""
    cols = list(table.columns)
    head = " & ".join(["Run", *[("$r=" + c + "$") if c[0].isdigit() else c for c in cols]]) + r" \\"
    lines = [r"\begin{tabular}{l" + "r" * len(cols) + "}", r"\toprule", head, r"\midrule"]
    for name, row in table.iterrows():
        cells = []
        for c in cols:
            v = row[c]
            cells.append(str(int(v)) if c == "images" else (f"{float(v):.3f}" if c == "ACR" else f"{100 * float(v):.1f}"))
        lines.append(" & ".join([str(name).replace("_", r"\_"), *cells]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines)


def plot_curves(results: Mapping[str, pd.DataFrame], path: str | Path, title: str = "") -> Path:
    """Certified accuracy against radius, one line per run, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top = max([float(df["radius"].max()) for df in results.values() if len(df)] + [0.5])
    grid = np.linspace(0.0, top * 1.05, 400)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for name, df in results.items():
        ax.plot(grid, certified_accuracy(df, grid), label=f"{name} (ACR {average_certified_radius(df):.3f})")
    ax.set_xlabel("radius (L2, pixel units in [0, 1])")
    ax.set_ylabel("certified accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
