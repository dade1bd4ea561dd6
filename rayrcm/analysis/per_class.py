"""Certified robustness per class: certified accuracy at each radius, ACR and abstention for the
images of each true label, and the worst class.

Certified robustness is known to be very uneven across classes (a smoothed classifier's radius
depends on how far an image sits from the other classes under noise), and the average hides it.
The rows of one certification are split by their ``label`` (the true class); each class's numbers
are those of :mod:`rayrcm.analysis.certified` on its images (the same definitions, sequential rows
included), and the worst class is the minimum over the classes that have images, per column.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from rayrcm.analysis.certified import (
    abstention_rate,
    average_certified_radius,
    certified_accuracy,
    is_sequential,
)


def per_class_table(df: pd.DataFrame, radii: Sequence[float], reach: float | None = None) -> pd.DataFrame:
    """One row per true class (index ``class``): ``images``, certified accuracy at each radius (NaN
    beyond ``reach``, the protocol's largest certifiable radius), ``ACR`` (NaN for sequential rows)
    and ``abstain``."""
    radii = [float(r) for r in radii]
    beyond = np.asarray(radii) > reach + 1e-12 if reach is not None else np.zeros(len(radii), bool)
    rows = {}
    for label, part in df.groupby("label", sort=True):
        acc = np.where(beyond, np.nan, certified_accuracy(part, radii))
        rows[int(label)] = {"images": len(part), **{f"{r:.2f}": a for r, a in zip(radii, acc)},
                            "ACR": average_certified_radius(part), "abstain": abstention_rate(part)}
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "class"
    return table


def worst_class(table: pd.DataFrame) -> pd.Series:
    """The lowest certified accuracy and ACR over the classes (the highest abstention), per column."""
    cols = [c for c in table.columns if c not in ("images", "abstain")]
    worst = table[cols].min(axis=0, skipna=True)
    worst["abstain"] = table["abstain"].max() if len(table) else np.nan
    return worst


def per_class_metrics(df: pd.DataFrame, radii: Sequence[float], reach: float | None = None) -> dict[str, float]:
    """Flat MLflow metrics: ``worst_class_certified_acc_0.50`` per radius and ``worst_class_acr``
    (not for sequential rows), with ``classes`` the number of classes certified; empty without labels
    or with a single class (the worst class would be the whole)."""
    if "label" not in df or df["label"].nunique() < 2:
        return {}
    table = per_class_table(df, radii, reach)
    worst = worst_class(table)
    out = {f"worst_class_certified_acc_{c}": float(worst[c]) for c in table.columns
           if c[0].isdigit() and np.isfinite(worst[c])}
    if not is_sequential(df):
        out["worst_class_acr"] = float(worst["ACR"])
    out["classes"] = float(len(table))
    return out


def per_class_markdown(results: Mapping[str, pd.DataFrame], radii: Sequence[float],
                       max_radii: Mapping[str, float | None] | None = None) -> str:
    """A Markdown section per run: its per-class table, then the worst class."""
    from rayrcm.analysis.certified import _fmt

    out = []
    for name, df in results.items():
        table = per_class_table(df, radii, (max_radii or {}).get(name))
        cols = list(table.columns)
        lines = [f"### {name}: per class", "", "| class | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
        lines += ["| " + str(k) + " | " + " | ".join(_fmt(c, row[c]) for c in cols) + " |" for k, row in table.iterrows()]
        worst = worst_class(table)
        lines.append("| worst | " + " | ".join("" if c == "images" else _fmt(c, worst[c]) for c in cols) + " |")
        out.append("\n".join(lines))
    return "\n\n".join(out)


def per_class_long(results: Mapping[str, pd.DataFrame], radii: Sequence[float],
                   max_radii: Mapping[str, float | None] | None = None) -> pd.DataFrame:
    """Every run's per-class table in one frame (columns ``run``, ``class``, ...): ``per_class.csv``."""
    frames = [per_class_table(df, radii, (max_radii or {}).get(name)).reset_index().assign(run=name)
              for name, df in results.items()]
    if not frames:
        return pd.DataFrame()
    long = pd.concat(frames, ignore_index=True)
    return long[["run", *[c for c in long.columns if c != "run"]]]
