"""The robustness profile's tables and plot: shard rows of ``rayrcm evaluate`` -> one row per
(set, corruption, severity, attack) in the result schema, headline SA / PGD / AutoAttack (standard)
/ APGD-CE+APGD-T (upper bound) / CS-s numbers, Markdown and LaTeX tables, and accuracy against
severity per corruption.

The result schema (:data:`RESULT_COLUMNS`) is every evaluation's: ``rayrcm evaluate``'s cells, a
certification's certified accuracy at each radius (:func:`certified_cells`: attack ``rs-sigma<s>``,
``radius`` the radius) and the fine-tuning chain's SA / PGD / AutoAttack counts
(:func:`robust_cells`); ``radius`` is 0 for every cell that is not a certified one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

RESULTS_FILE = "results.parquet"
RESULT_COLUMNS = ["model", "set", "corruption", "severity", "generated", "attack", "radius", "images", "correct",
                  "accuracy"]
NONE = "none"
# shifted sets (their own images, no corruption) -> their column in the seed-004 table
SHIFT_SETS = {"cifar10.1": "CIFAR-10.1", "imagenet-sketch": "Sketch", "stylized-imagenet": "Stylized",
              "imagenet-r": "R"}
CERTIFIED = "rs-sigma"  # the attack of a certified cell: rs-sigma<sigma> (randomized smoothing, L2 radius)


def is_certified(attack: str) -> bool:
    return str(attack).startswith(CERTIFIED)


def results_table(rows: pd.DataFrame, model: str | None = None) -> pd.DataFrame:
    """Shard rows -> one row per cell in the result schema (:data:`RESULT_COLUMNS`), sorted."""
    if not len(rows):
        return pd.DataFrame(columns=RESULT_COLUMNS)
    rows = rows.copy()
    if model is not None:
        rows["model"] = model
    if "radius" not in rows.columns:
        rows["radius"] = 0.0
    keys = ["model", "set", "corruption", "severity", "generated", "attack", "radius"]
    t = rows.groupby(keys, sort=False, as_index=False)[["images", "correct"]].sum()
    t["radius"] = t["radius"].astype(float)
    t["severity"] = t["severity"].astype(int)
    t["generated"] = t["generated"].astype(bool)
    t["images"] = t["images"].astype(int)
    t["correct"] = t["correct"].astype(int)
    t["accuracy"] = t["correct"] / t["images"].clip(lower=1)
    order = {"none": 0}
    t["_clean"] = (t["corruption"] != NONE).astype(int)
    t["_attack"] = t["attack"].map(lambda a: order.get(a, 1))
    t = t.sort_values(["_clean", "_attack", "attack", "radius", "set", "corruption", "severity"])
    t = t.drop(columns=["_clean", "_attack"])
    return t[RESULT_COLUMNS].reset_index(drop=True)


def certified_cells(rows: pd.DataFrame, protocol: dict[str, Any], radii: list[float], model: str = "") -> pd.DataFrame:
    """A certification's rows (one per image: ``correct``, ``radius``) -> result-schema cells, one per
    radius (up to ``protocol``'s reach where the caller cut ``radii``): accuracy = the fraction of
    images certified correct at that radius or beyond (:func:`rayrcm.analysis.certified_accuracy`)."""
    import numpy as np

    correct = rows["correct"].to_numpy().astype(bool)
    radius = rows["radius"].to_numpy(dtype=float)
    corruption = str(protocol.get("corruption") or NONE)
    cells = [{"model": model or str(protocol.get("model_sha256", ""))[:12], "set": str(protocol.get("dataset", "")),
              "corruption": corruption, "severity": int(protocol.get("severity") or 0) if corruption != NONE else 0,
              "generated": False, "attack": f"{CERTIFIED}{float(protocol.get('sigma', 0)):g}", "radius": float(r),
              "images": len(rows), "correct": int(np.sum(correct & (radius >= r)))} for r in radii]
    return results_table(pd.DataFrame(cells))


def robust_cells(counts: list[int], *, pgd_steps: int, autoattack: bool = True, aa_version: str = "standard",
                 model: str = "", set_: str = "") -> pd.DataFrame:
    """The fine-tuning chain's counts ``[total, SA, PGD-k, APGD-CE+APGD-T, AutoAttack (standard)]``
    (:func:`rayrcm.eval.robust.robust_counts`, with its config's ``autoattack`` and ``aa_version``)
    -> result-schema cells."""
    total, sa, pgd, apgd, aa = (int(c) for c in (list(counts) + [0] * 5)[:5])
    cells = [(NONE, sa), (f"pgd{pgd_steps}", pgd)]
    if autoattack:
        cells += [("aa-apgd", apgd)] + ([("aa", aa)] if aa_version == "standard" else [])
    return results_table(pd.DataFrame([{"model": model, "set": set_, "corruption": NONE, "severity": 0,
                                        "generated": False, "attack": a, "images": total, "correct": c}
                                       for a, c in cells]))


def _attack_label(attack: str) -> str:
    from rayrcm.attacks.autoattack import LABELS

    if attack in LABELS:
        return LABELS[attack]
    if attack.startswith("pgd"):
        return f"PGD-{attack[3:]}"
    return attack


# robustbench/data.py:182-185, the 15 corruptions of CIFAR-10-C, CIFAR-100-C and ImageNet-C, in its spelling
CORRUPTIONS = ("shot_noise", "motion_blur", "snow", "pixelate", "gaussian_noise", "defocus_blur", "brightness", "fog",
               "zoom_blur", "frost", "glass_blur", "impulse_noise", "contrast", "jpeg_compression", "elastic_transform")
SEVERITIES = (1, 2, 3, 4, 5)
# AlexNet's ImageNet-C error, the mean over severities 1-5 (RobustBench's unaggregated_results.csv at 78fcc9e)
ALEXNET_ERROR = {"shot_noise": 0.8883, "motion_blur": 0.7872, "snow": 0.8680, "pixelate": 0.7186, "gaussian_noise": 0.8816,
                 "defocus_blur": 0.8220, "brightness": 0.5585, "fog": 0.8236, "zoom_blur": 0.7957, "frost": 0.8315,
                 "glass_blur": 0.8308, "impulse_noise": 0.9172, "contrast": 0.8543, "jpeg_compression": 0.6068,
                 "elastic_transform": 0.6480}


def released_cells(table: pd.DataFrame, set_: str) -> pd.DataFrame:
    """The released set's clean-label cells (no attack), one accuracy per corruption and severity."""
    sel = table[(table["set"] == set_) & (table["attack"] == NONE) & ~table["generated"].astype(bool)
                & (table["corruption"] != NONE)]
    return sel.groupby(["corruption", "severity"])[["correct", "images"]].sum()


def corruption_errors(table: pd.DataFrame) -> dict[str, float]:
    """``CE_c`` for each ImageNet-C corruption measured at all five severities."""
    cells = released_cells(table, "imagenet-c")
    out = {}
    for c in CORRUPTIONS:
        if all((c, s) in cells.index for s in SEVERITIES):
            err = [1 - cells.loc[(c, s), "correct"] / max(cells.loc[(c, s), "images"], 1) for s in SEVERITIES]
            out[c] = float(sum(err) / (len(SEVERITIES) * ALEXNET_ERROR[c]))
    return out


def mean_corruption_error(table: pd.DataFrame) -> tuple[float, int] | None:
    """``(mCE, corruptions it averages)`` over the ImageNet-C corruptions measured at every severity
    (RobustBench's when all 15 are); None without one."""
    ce = corruption_errors(table)
    return (sum(ce.values()) / len(ce), len(ce)) if ce else None


def headline(table: pd.DataFrame) -> dict[str, float]:
    """The seed-001 row: SA, PGD-k, AutoAttack (standard), APGD-CE+APGD-T (upper bound) on the clean
    set (not a shifted one, :data:`SHIFT_SETS`; no certified cell), and CS-s (mean accuracy over the
    corruptions at severity s; ``(generated)`` when the corruptions were generated here)."""
    out: dict[str, float] = {}
    if table.empty:  # (an empty object column would index columns, not rows)
        return out
    table = table[~table["attack"].map(is_certified)]
    clean = table[(table["corruption"] == NONE) & ~table["set"].isin(list(SHIFT_SETS))]
    for r in clean.itertuples():
        out["SA" if r.attack == NONE else _attack_label(r.attack)] = float(r.accuracy)
    corr = table[(table["corruption"] != NONE) & (table["attack"] == NONE)]
    for (gen, sev), g in corr.groupby(["generated", "severity"], sort=True):
        out[f"CS-{int(sev)}" + (" (generated)" if gen else "")] = float(g["accuracy"].mean())
    mce = mean_corruption_error(table)
    if mce is not None:  # ImageNet-C: RobustBench's mCE, over the corruptions measured at every severity
        out["mCE" if mce[1] == len(CORRUPTIONS) else f"mCE ({mce[1]}/{len(CORRUPTIONS)})"] = mce[0]
    return out


def shift_row(table: pd.DataFrame) -> dict[str, float]:
    """Seed 004's row: clean, C (mean accuracy over every corruption and severity; ``(generated)``
    when generated here), then each shifted set's accuracy."""
    plain = table[(table["attack"] == NONE)]
    out: dict[str, float] = {}
    head = headline(table)
    if "SA" in head:
        out["clean"] = head["SA"]
    corr = plain[plain["corruption"] != NONE]
    for gen, g in corr.groupby("generated", sort=True):
        out["C (generated)" if gen else "C"] = float(g["accuracy"].mean())
    for name, label in SHIFT_SETS.items():
        cell = plain[(plain["set"] == name) & (plain["corruption"] == NONE)]
        if len(cell):
            out[label] = float(cell["correct"].sum() / max(int(cell["images"].sum()), 1))
    return out


def certified_rows(label: str, table: pd.DataFrame) -> dict[str, dict[str, float]]:
    """Certified accuracy by radius, one row per smoothing level of the result."""
    if table.empty:
        return {}
    cert = table[table["attack"].map(is_certified)]
    several = cert["attack"].nunique() > 1
    return {(f"{label} {a}" if several else label): {f"{r.radius:.2f}": float(r.accuracy) for r in g.itertuples()}
            for a, g in cert.groupby("attack", sort=True)}


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
