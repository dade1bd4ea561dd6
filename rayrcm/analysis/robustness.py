"""The robustness profile's tables and plot: shard rows of ``rayrcm evaluate`` -> one row per
(set, corruption, severity, attack) in the result schema, headline SA / PGD / AutoAttack (standard)
/ APGD-CE+APGD-T (upper bound) / CS-s numbers, Markdown and LaTeX tables, and accuracy against
severity per corruption."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

RESULTS_FILE = "results.parquet"
RESULT_COLUMNS = ["model", "set", "corruption", "severity", "generated", "attack", "images", "correct", "accuracy"]
NONE = "none"


def results_table(rows: pd.DataFrame, model: str | None = None) -> pd.DataFrame:
    """Shard rows -> one row per cell in the result schema (:data:`RESULT_COLUMNS`), sorted."""
    if not len(rows):
        return pd.DataFrame(columns=RESULT_COLUMNS)
    rows = rows.copy()
    if model is not None:
        rows["model"] = model
    keys = ["model", "set", "corruption", "severity", "generated", "attack"]
    t = rows.groupby(keys, sort=False, as_index=False)[["images", "correct"]].sum()
    t["severity"] = t["severity"].astype(int)
    t["generated"] = t["generated"].astype(bool)
    t["images"] = t["images"].astype(int)
    t["correct"] = t["correct"].astype(int)
    t["accuracy"] = t["correct"] / t["images"].clip(lower=1)
    order = {"none": 0}
    t["_clean"] = (t["corruption"] != NONE).astype(int)
    t["_attack"] = t["attack"].map(lambda a: order.get(a, 1))
    t = t.sort_values(["_clean", "_attack", "attack", "set", "corruption", "severity"])
    t = t.drop(columns=["_clean", "_attack"])
    return t[RESULT_COLUMNS].reset_index(drop=True)


def _attack_label(attack: str) -> str:
    from rayrcm.attacks.autoattack import LABELS

    if attack in LABELS:
        return LABELS[attack]
    if attack.startswith("pgd"):
        return f"PGD-{attack[3:]}"
    return attack


def headline(table: pd.DataFrame) -> dict[str, float]:
    """The seed-001 row: SA, PGD-k, AutoAttack (standard), APGD-CE+APGD-T (upper bound) on the clean
    set, and CS-s (mean accuracy over the corruptions at severity s; ``(generated)`` when the
    corruptions were generated here)."""
    out: dict[str, float] = {}
    clean = table[table["corruption"] == NONE]
    for r in clean.itertuples():
        out["SA" if r.attack == NONE else _attack_label(r.attack)] = float(r.accuracy)
    corr = table[(table["corruption"] != NONE) & (table["attack"] == NONE)]
    for (gen, sev), g in corr.groupby(["generated", "severity"], sort=True):
        out[f"CS-{int(sev)}" + (" (generated)" if gen else "")] = float(g["accuracy"].mean())
    return out


def to_markdown(table: pd.DataFrame) -> str:
    """The headline row, then every cell (one line per set, corruption, severity and attack)."""
    head = headline(table)
    lines = []
    if head:
        lines += ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head),
                  "| " + " | ".join(f"{v:.3f}" for v in head.values()) + " |", ""]
    lines += ["| set | corruption | severity | generated | attack | images | accuracy |",
              "|---|---|---:|---|---|---:|---:|"]
    for r in table.itertuples():
        lines.append(f"| {r.set} | {r.corruption} | {r.severity} | {'generated' if r.generated else 'no'} | "
                     f"{_attack_label(r.attack)} | {r.images} | {r.accuracy:.3f} |")
    return "\n".join(lines)


def _tex(s: str) -> str:
    return str(s).replace("_", r"\_").replace("%", r"\%")


def to_latex(table: pd.DataFrame) -> str:
    """Booktabs tabulars: the headline row, then every cell; accuracies in percent."""
    head = headline(table)
    lines = []
    if head:
        lines += [r"\begin{tabular}{" + "r" * len(head) + "}", r"\toprule",
                  " & ".join(_tex(k) for k in head) + r" \\", r"\midrule",
                  " & ".join(f"{100 * v:.1f}" for v in head.values()) + r" \\", r"\bottomrule", r"\end{tabular}", ""]
    lines += [r"\begin{tabular}{lllllrr}", r"\toprule",
              r"Set & Corruption & Severity & Generated & Attack & Images & Accuracy \\", r"\midrule"]
    for r in table.itertuples():
        lines.append(" & ".join([_tex(r.set), _tex(r.corruption), str(r.severity), "yes" if r.generated else "no",
                                 _tex(_attack_label(r.attack)), str(r.images), f"{100 * r.accuracy:.1f}"]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines)


def plot_severity(table: pd.DataFrame, path: str | Path, title: str = "") -> Path | None:
    """Accuracy against severity, one line per (set, corruption), the clean accuracy dashed; None
    when the table has no corruption."""
    corr = table[(table["corruption"] != NONE) & (table["attack"] == NONE)]
    if not len(corr):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for (set_, name), g in corr.groupby(["set", "corruption"], sort=True):
        g = g.sort_values("severity")
        label = name + (" (generated)" if bool(g["generated"].iloc[0]) else f" ({set_})")
        ax.plot(g["severity"], g["accuracy"], marker="o", label=label)
    clean = table[(table["corruption"] == NONE) & (table["attack"] == NONE)]
    if len(clean):
        ax.axhline(float(clean["accuracy"].iloc[0]), color="black", linestyle="--", linewidth=1, label="clean")
    ax.set_xlabel("severity")
    ax.set_ylabel("accuracy")
    ax.set_xticks(sorted(corr["severity"].unique()))
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_outputs(table: pd.DataFrame, out: Path, title: str = "") -> list[Path]:
    """``results.parquet``, ``results.csv``, ``table.md``, ``table.tex`` and the severity plot in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    table.to_parquet(out / RESULTS_FILE, index=False)
    table.to_csv(out / "results.csv", index=False)
    (out / "table.md").write_text(to_markdown(table) + "\n")
    (out / "table.tex").write_text(to_latex(table) + "\n")
    files = [out / RESULTS_FILE, out / "results.csv", out / "table.md", out / "table.tex"]
    png = plot_severity(table, out / "accuracy_vs_severity.png", title)
    return files + ([png] if png else [])


def metric_name(r: Any) -> str:
    """The MLflow metric of one result cell, e.g. ``acc/digits-c-generated/contrast/s3/none``."""
    return f"acc/{r.set}/{r.corruption}/s{r.severity}/{r.attack}"


def headline_metric(key: str) -> str:
    return key.lower().replace(" (upper bound)", "_upper_bound").replace(" (generated)", "_generated") \
        .replace(" (standard)", "_standard").replace("+", "_").replace("-", "").replace(" ", "_")
