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


# ----------------------------------------------------------------------------- rayrcm evaluate's cells per class

CELL_KEYS = ["model", "set", "corruption", "severity", "generated", "attack"]


def evaluation_classes(rows: pd.DataFrame, model: str | None = None) -> pd.DataFrame | None:
    """``rayrcm evaluate``'s shard rows -> one row per (cell, true class): ``images``, ``correct``,
    ``accuracy``; None when a shard has no per-class counts (written before they were kept)."""
    import json

    if not len(rows) or "per_class" not in rows or rows["per_class"].isna().any():
        return None
    recs = []
    for r in rows.to_dict("records"):
        for label, (n, c) in json.loads(r["per_class"]).items():
            recs.append({**{k: r[k] for k in CELL_KEYS}, "class": int(label), "images": int(n), "correct": int(c)})
    t = pd.DataFrame(recs)
    if model is not None:
        t["model"] = model
    t = t.groupby(CELL_KEYS + ["class"], as_index=False, sort=True)[["images", "correct"]].sum()
    t["accuracy"] = t["correct"] / t["images"].clip(lower=1)
    return t


def worst_classes(classes: pd.DataFrame) -> pd.DataFrame:
    """Per cell: ``classes``, the ``worst_class`` and its ``worst_accuracy`` (ties: the lowest label),
    and ``best_accuracy``."""
    ordered = classes.sort_values(CELL_KEYS + ["accuracy", "class"])
    g = ordered.groupby(CELL_KEYS, sort=False)
    out = g.agg(classes=("class", "size"), worst_class=("class", "first"), worst_accuracy=("accuracy", "first"),
                best_accuracy=("accuracy", "max")).reset_index()
    return out


def worst_class_headline(classes: pd.DataFrame) -> dict[str, float]:
    """``worst-class SA``, ``worst-class PGD-20``, ... : the lowest per-class accuracy of each clean-set
    cell (the headline's SA and attacks; not a corrupted or shifted set)."""
    from rayrcm.analysis.robustness import NONE, SHIFT_SETS, _attack_label

    worst = worst_classes(classes)
    clean = worst[(worst["corruption"] == NONE) & ~worst["set"].isin(list(SHIFT_SETS)) & (worst["classes"] > 1)]
    return {f"worst-class {'SA' if r.attack == NONE else _attack_label(r.attack)}": float(r.worst_accuracy)
            for r in clean.itertuples()}


def evaluation_classes_markdown(classes: pd.DataFrame) -> str:
    """One line per cell: accuracy over all images, the worst class and the best class's accuracy."""
    from rayrcm.analysis.robustness import _attack_label

    worst = worst_classes(classes)
    total = classes.groupby(CELL_KEYS, sort=False)[["images", "correct"]].sum().reset_index()
    worst = worst.merge(total, on=CELL_KEYS)
    lines = ["| set | corruption | severity | attack | images | accuracy | classes | worst class | worst | best |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in worst.itertuples():
        lines.append(f"| {r.set} | {r.corruption} | {r.severity} | {_attack_label(r.attack)} | {r.images} | "
                     f"{r.correct / max(r.images, 1):.3f} | {r.classes} | {r.worst_class} | {r.worst_accuracy:.3f} | "
                     f"{r.best_accuracy:.3f} |")
    return "\n".join(lines)
