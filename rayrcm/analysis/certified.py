"""Certified accuracy, average certified radius, tables and curves from certification rows.

* certified accuracy at radius r: the fraction of images with ``correct == 1`` and
  ``radius >= r`` (Cohen et al. 2019, ``analyze.py``); at r = 0 it is the smoothed classifier's
  accuracy, abstentions counting as errors;
* ACR (average certified radius, Zhai et al., MACER, ICLR 2020): ``mean(radius * correct)`` over
  all images, abstentions and errors contributing 0;
* abstention rate: the fraction with ``predict == -1``;
* samples: the Monte Carlo draws spent, summed over the images (selection plus estimation: with
  input-specific sampling, the cost an ACR was bought at), and per image (mean and max).

Sequential rows (``rayrcm certify --sampling sequential``, a ``decisions`` column): each image was
decided at the protocol's radii only and stopped there, so its ``radius`` is a sound lower bound
but not the fixed protocol's radius: certified accuracy is read at the protocol's radii, and ACR,
which would average early-stopped radii, is left empty.

Reach: with ``n`` estimation draws no radius can exceed ``sigma * Phi^-1(alpha ** (1 / n))``
(:func:`rayrcm.certify.stats.max_certifiable_radius`); given that maximum, the radius grid stops
there and a run's accuracy at a radius beyond its own reach is left empty (NaN, ``-`` in the
tables), never reported as a measured 0.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import cast

import numpy as np
import pandas as pd

SAMPLE_COLUMNS = ("samples", "samples/img", "max/img")  # draws spent: in total, per image (mean, max)


def default_radii(frames: Sequence[pd.DataFrame], max_radius: float | None = None) -> list[float]:
    """0 to 2.0 in steps of 0.25, extended (up to 4.0) to cover the largest certified radius, and
    stopped at ``max_radius`` (the largest radius the protocol can certify) when it is known."""
    top = max([float(df["radius"].max()) for df in frames if len(df)] + [0.0])
    stop = min(4.0, max(2.0, np.ceil(top * 4) / 4))
    radii = [round(r, 2) for r in np.arange(0.0, stop + 1e-9, 0.25)]
    if max_radius is not None:
        radii = [r for r in radii if r <= max_radius + 1e-12] or [0.0]
    return radii


def _reach(max_radii: Mapping[str, float | None] | None, name: str) -> float | None:
    return None if max_radii is None else max_radii.get(name)


def _top_reach(max_radii: Mapping[str, float | None] | None, names: Sequence[str]) -> float | None:
    """The largest reach over the runs, when every run's is known (else None: no cut)."""
    if not max_radii or any(max_radii.get(n) is None for n in names):
        return None
    return max(float(max_radii[n]) for n in names)  # type: ignore[arg-type]


def certified_accuracy(df: pd.DataFrame, radii: Iterable[float]) -> np.ndarray:
    correct = df["correct"].to_numpy().astype(bool)
    radius = df["radius"].to_numpy(dtype=float)
    return np.array([float(np.mean(correct & (radius >= r))) if len(df) else 0.0 for r in radii])


def _samples_each(df: pd.DataFrame) -> np.ndarray | None:
    """Draws spent on each image (``samples``; from the count columns in rows written before it);
    None when the rows do not say (a Cohen-format TSV)."""
    if "samples" in df and not df["samples"].isna().any():
        return cast(np.ndarray, df["samples"].to_numpy(dtype=float))
    cols = [c for c in ("counts_selection", "counts_estimation", "counts") if c in df]
    if not cols and len(df):
        return None
    per = np.zeros(len(df))
    for c in cols:
        per += np.array([float(np.sum(v)) if isinstance(v, (list, np.ndarray)) else 0.0 for v in df[c]])
    return per


def total_samples(df: pd.DataFrame) -> float:
    """Draws spent on ``df``'s images; NaN when the rows do not say (a Cohen-format TSV)."""
    per = _samples_each(df)
    return float("nan") if per is None else float(per.sum())


def is_sequential(df: pd.DataFrame) -> bool:
    """Rows of a sequential certification (decided per radius, stopped early)."""
    return "decisions" in df.columns


def samples_per_image(df: pd.DataFrame) -> tuple[float, float]:
    """``(mean, max)`` draws per image; NaN when the rows do not say."""
    per = _samples_each(df)
    if per is None or not len(per):
        return float("nan"), float("nan")
    return float(per.mean()), float(per.max())


def average_certified_radius(df: pd.DataFrame) -> float:
    """ACR; NaN for sequential rows (their radii stop where the grid was decided)."""
    if is_sequential(df):
        return float("nan")
    return float(np.mean(df["radius"].to_numpy(dtype=float) * df["correct"].to_numpy())) if len(df) else 0.0


def abstention_rate(df: pd.DataFrame) -> float:
    return float(np.mean(df["predict"].to_numpy() == -1)) if len(df) else 0.0


def summary_table(results: Mapping[str, pd.DataFrame], radii: Sequence[float] | None = None,
                  max_radii: Mapping[str, float | None] | None = None) -> pd.DataFrame:
    """One row per run: certified accuracy at each radius, ACR, abstention rate, image count.

    ``max_radii``: each run's largest certifiable radius, where known; the default grid stops at
    the largest of them, and a run's cells beyond its own are NaN."""
    if radii is None:
        radii = default_radii(list(results.values()), _top_reach(max_radii, list(results)))
    radii = list(radii)
    rows = {}
    for name, df in results.items():
        acc = certified_accuracy(df, radii)
        reach = _reach(max_radii, name)
        if reach is not None:
            acc = np.where(np.asarray(radii, dtype=float) <= reach + 1e-12, acc, np.nan)
        mean, top = samples_per_image(df)
        rows[name] = {**{f"{r:.2f}": a for r, a in zip(radii, acc)}, "ACR": average_certified_radius(df),
                      "abstain": abstention_rate(df), "images": len(df), "samples": total_samples(df),
                      "samples/img": mean, "max/img": top}
    table = pd.DataFrame.from_dict(rows, orient="index")
    if not table.empty and table["samples"].isna().all():  # Cohen-format files do not say
        table = table.drop(columns=list(SAMPLE_COLUMNS))
    return table


def summary_metrics(df: pd.DataFrame, radii: Sequence[float] | None = None,
                    max_radius: float | None = None) -> dict[str, float]:
    """Flat metrics for MLflow: ``certified_acc_0.50``, ``acr``, ``abstain_rate``, ``images``,
    ``max_certifiable_radius`` when known (no ``certified_acc_*`` beyond it). (The worst class's:
    :func:`rayrcm.analysis.per_class.per_class_metrics`.)"""
    radii = list(radii) if radii is not None else default_radii([df], max_radius)
    if max_radius is not None:
        radii = [r for r in radii if r <= max_radius + 1e-12]
    out = {f"certified_acc_{r:.2f}": float(a) for r, a in zip(radii, certified_accuracy(df, radii))}
    out.update(abstain_rate=abstention_rate(df), images=float(len(df)))
    if not is_sequential(df):
        out["acr"] = average_certified_radius(df)
    if np.isfinite(total_samples(df)):
        out["samples"] = total_samples(df)
        out["samples_per_image_mean"], out["samples_per_image_max"] = samples_per_image(df)
    if max_radius is not None:
        out["max_certifiable_radius"] = float(max_radius)
    return out


def _fmt(col: str, v: float | None) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "-"  # beyond the run's reach: not measured
    if col == "images" or col in SAMPLE_COLUMNS:
        return f"{int(round(float(v))):,}"
    return f"{float(v):.3f}"


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
            if isinstance(v, float) and np.isnan(v):
                cells.append("--")
                continue
            cells.append(str(int(round(float(v)))) if c == "images" or c in SAMPLE_COLUMNS
                         else (f"{float(v):.3f}" if c == "ACR" else f"{100 * float(v):.1f}"))
        lines.append(" & ".join([str(name).replace("_", r"\_"), *cells]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines)


def plot_curves(results: Mapping[str, pd.DataFrame], path: str | Path, title: str = "",
                max_radii: Mapping[str, float | None] | None = None) -> Path:
    """Certified accuracy against radius, one line per run, as a PNG (a dotted line at each run's
    largest certifiable radius, where known; shaded: from the worst to the best class)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top = max([float(df["radius"].max()) for df in results.values() if len(df)] + [0.5])
    grid = np.linspace(0.0, top * 1.05, 400)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for name, df in results.items():
        tag = "sequential" if is_sequential(df) else f"ACR {average_certified_radius(df):.3f}"
        line = ax.plot(grid, certified_accuracy(df, grid), label=f"{name} ({tag})")[0]
        if "label" in df and df["label"].nunique() > 1:  # the spread across classes: lowest to highest class
            curves = np.stack([certified_accuracy(part, grid) for _, part in df.groupby("label")])
            ax.fill_between(grid, curves.min(0), curves.max(0), color=line.get_color(), alpha=0.12, linewidth=0)
        reach = _reach(max_radii, name)
        if reach is not None:
            ax.axvline(reach, color=line.get_color(), linestyle=":", linewidth=1)
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
