"""What ``rayrcm analyze`` and a finished certification write: tables and curves, and the label of
each result in them (pandas/matplotlib; no Ray, no MLflow)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from rayrcm.analysis.certified import plot_curves, summary_table, to_latex, to_markdown
from rayrcm.analysis.per_class import per_class_long, per_class_markdown

RESULT_SUFFIXES = (".tsv", ".txt", ".csv", ".parquet")


def write_analysis(results: dict[str, pd.DataFrame], folder: Path, title: str = "",
                   radii: list[float] | None = None, max_radii: dict[str, float | None] | None = None) -> list[Path]:
    """``table.md``, ``table.tex`` and ``certified_accuracy.png`` in ``folder`` (``max_radii``: each
    run's largest certifiable radius, where known; see :func:`summary_table`), and the same per
    true class, with the worst class, in ``per_class.md`` and ``per_class.csv``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    table = summary_table(results, radii, max_radii)
    (folder / "table.md").write_text(to_markdown(table) + "\n")
    (folder / "table.tex").write_text(to_latex(table) + "\n")
    png = plot_curves(results, folder / "certified_accuracy.png", title=title, max_radii=max_radii)
    files = [folder / "table.md", folder / "table.tex", png]
    if all("label" in df for df in results.values()):  # a Cohen-format file has its label column too
        grid = table_radii(table)
        (folder / "per_class.md").write_text(per_class_markdown(results, grid, max_radii) + "\n")
        per_class_long(results, grid, max_radii).to_csv(folder / "per_class.csv", index=False)
        files += [folder / "per_class.md", folder / "per_class.csv"]
    return files


def table_radii(table: pd.DataFrame) -> list[float]:
    """The radii of a :func:`summary_table` (its columns that are radii)."""
    return [float(c) for c in table.columns if str(c)[0].isdigit()]


def _base(path: Path) -> str:
    """A folder's name; a file's name less a known results suffix (``sigma_0.25`` stays whole)."""
    if not path.is_dir() and path.suffix.lower() in RESULT_SUFFIXES:
        return path.name[: -len(path.suffix)]
    return path.name


def result_labels(paths: Sequence[str | Path]) -> list[str]:
    """One label per result: its base name, prefixed by as many parent folders as it takes to tell
    results with the same name apart (``resnet50/sigma_0.25``, ``resnet110/sigma_0.25``); files of
    one folder that differ only by suffix keep it (``a.tsv``, ``a.txt``). A path given twice is
    numbered (``sigma_0.25#2``)."""
    resolved = [Path(p).expanduser().resolve() for p in paths]
    unique = list(dict.fromkeys(resolved))
    parents = [p.parent.parts[1:] for p in unique]  # without the root
    depth, whole = [0] * len(unique), [False] * len(unique)

    def label(i: int) -> str:
        return "/".join([*parents[i][len(parents[i]) - depth[i]:], unique[i].name if whole[i] else _base(unique[i])])

    changed = True
    while changed:
        labels, changed = [label(i) for i in range(len(unique))], False
        for i, name in enumerate(labels):
            twins = [j for j, other in enumerate(labels) if other == name and j != i]
            if twins and not whole[i] and any(unique[j].parent == unique[i].parent for j in twins):
                whole[i] = changed = True
            elif twins and depth[i] < len(parents[i]):
                depth[i] += 1
                changed = True
    by_path = {p: label(i) for i, p in enumerate(unique)}
    out: list[str] = []
    seen: Counter[str] = Counter()
    for p in resolved:
        seen[by_path[p]] += 1
        out.append(by_path[p] if seen[by_path[p]] == 1 else f"{by_path[p]}#{seen[by_path[p]]}")
    return out
