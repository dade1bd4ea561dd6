"""The table a paper prints: one row per model, its robustness and its certification side by side.

``rayrcm compare`` reads evaluations, certifications and fine-tuning runs (:class:`Result`: each
one's result-schema cells, the model it measured and its protocol) and merges the results of one
model into one row (:func:`paper_table`):

* the model is known by the SHA-256 of its file (every folder's and run's ``protocol.json``), by its
  MLflow training run (a fine-tuning run's metrics; a certification or evaluation run that is its
  child), or by the reference in its cells; results that share any of these are one model;
* its row is named after the model (``rcm-digits@sigma-0_25``, a run's name, a file's name), not
  after a job; two models of one name get their hashes appended;
* a column two results of one model both fill with different values (the same model certified at
  two sigmas, or attacked at two budgets) opens a second row for the later result, named
  ``model [job]``: nothing is averaged away and nothing overwritten;
* columns: SA, PGD-k, AutoAttack, APGD, CS-1/3/5 (seed 001), C and the shifted sets (seed 004),
  then certified accuracy at each L2 radius, ACR and abstention (Cohen et al.; MACER);
* the settings go in the header (sigma, n, alpha, sampling; the attack budget eps, norm, steps) when
  every row shares them; a setting that differs between rows becomes a column and a note says so
  (a smaller n caps the radius a row can reach; radii at different sigmas are not one budget);
* accuracies are in percent in both Markdown and LaTeX (the header says so), ACR in L2 units;
  ``-``: not measured (no such result, or beyond a certification's reach).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, cast

import pandas as pd

from rayrcm.analysis.robustness import SHIFT_SETS, certified_rows, headline, shift_row

CERT_SETTINGS = ("sigma", "n", "alpha", "sampling")  # a certification's settings, in the header or as columns
ATTACK_SETTINGS = ("eps", "norm", "pgd_steps", "step_size")  # an evaluation's attack budget


@dataclass
class Result:
    """One evaluation, certification or fine-tuning mode: its result-schema cells and what it measured."""

    label: str  # the job's label (folder or run name)
    cells: pd.DataFrame
    keys: set[str] = field(default_factory=set)  # what the model is known by: "sha:<hex>", "run:<id>", "ref:<uri>"
    name: str = ""  # the model's name for a row ("" unknown: the job's label is used)
    protocol: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, float] = field(default_factory=dict)  # a certification's ACR and abstention rate
    extra: dict[str, float] = field(default_factory=dict)  # more accuracy columns (a linear probe's)
    worst: dict[str, float] = field(default_factory=dict)  # the worst class's numbers, by column: the --per-class view


@dataclass
class PaperTable:
    table: pd.DataFrame  # rows: models; accuracies as fractions
    header: list[str]  # the settings every row shares
    notes: list[str]  # settings that differ between rows, rows split


def model_name(ref: str) -> str:
    """A model reference as a row name: ``models:/rcm-digits@sigma-0_25`` -> ``rcm-digits@sigma-0_25``,
    ``runs:/<id>/model`` or a run id -> ``run <id[:8]>``, a path -> its file name (its folder's for a
    ``model.pt``)."""
    ref = str(ref or "").strip()
    if not ref:
        return ""
    if ref.startswith("models:/"):
        return ref[len("models:/"):]
    m = re.fullmatch(r"(?:runs:/)?([0-9a-f]{32})(?:/.*)?", ref)
    if m:
        return f"run {m[1][:8]}"
    parts = [p for p in ref.replace("\\", "/").split("/") if p]
    if not parts:
        return ref
    if parts[-1] in ("model.pt", "best.pt", "last.pt") and len(parts) > 1:
        return parts[-2]
    return parts[-1]


def _columns(result: Result, per_class: bool = False) -> tuple[dict[str, float], dict[str, Any]]:
    """The result's cells as one row (robustness headline, shift columns, certified accuracy by radius;
    with ``per_class`` the worst class's too, as ``worst <column>``) and the settings those cells were
    measured under (:data:`CERT_SETTINGS`, :data:`ATTACK_SETTINGS`)."""
    head = headline(result.cells)
    row: dict[str, float] = dict(head)
    if result.cells["set"].isin(list(SHIFT_SETS)).any():
        row.update({k: v for k, v in shift_row(result.cells).items() if k != "clean" or "SA" not in row})
    cert = certified_rows("x", result.cells)
    for values in cert.values():  # one sigma per certification
        row.update({f"r={r}": v for r, v in values.items()})
    if cert:
        row.update({k: float(v) for k, v in result.summary.items()})
    row.update({k: float(v) for k, v in result.extra.items()})
    if per_class:
        row.update({f"worst {k}": float(v) for k, v in result.worst.items() if k in row})
    p, sets = result.protocol, {}
    if cert:
        sets.update({k: p[k] for k in CERT_SETTINGS if k in p})
        if p.get("mode") == "predict":
            sets["sampling"] = "predict"
    if "eps" in p and head:
        sets.update({k: p[k] for k in ATTACK_SETTINGS if k in p})
    return row, sets


def _groups(results: list[Result]) -> list[list[int]]:
    """Indices of the results of each model, in the order given (results sharing a key are one model)."""
    parent = list(range(len(results)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[str, int] = {}
    for i, r in enumerate(results):
        for key in r.keys:
            if key in owner:
                a, b = find(owner[key]), find(i)
                parent[max(a, b)] = min(a, b)
            else:
                owner[key] = i
    groups: dict[int, list[int]] = {}
    for i in range(len(results)):
        groups.setdefault(find(i), []).append(i)
    return list(groups.values())


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= 1e-12
    return cast(bool, a == b)


def _order(col: str) -> tuple[int, float, str]:
    """SA, PGD, AA, APGD, CS-s; C, the shifted sets; the settings that vary; radii; ACR, abstain (a
    ``worst`` column right after its own)."""
    if col.startswith("worst "):
        rank, value, _ = _order(col[len("worst "):])
        return rank, value, col
    first = ("SA", "PGD", "AutoAttack", "APGD", "CS-")
    for rank, start in enumerate(first):
        if col.startswith(start):
            return rank, float(re.sub(r"\D", "", col.split(" ")[0]) or 0) if start == "CS-" else 0.0, col
    later = ("clean", "C", "C (generated)", *SHIFT_SETS.values(), *ATTACK_SETTINGS, *CERT_SETTINGS)
    if col in later:
        return 10 + later.index(col), 0.0, col
    if col.startswith("r="):
        return 40, float(col[2:]), col
    return {"ACR": 50, "abstain": 51}.get(col, 30), 0.0, col


def _fmt_setting(key: str, value: Any) -> str:
    if key in ("eps", "step_size") and isinstance(value, (int, float)) and value > 0:
        k = float(value) * 255
        return f"{round(k)}/255" if abs(k - round(k)) < 1e-6 else f"{float(value):g}"
    if key == "n" and isinstance(value, (int, float)):
        return f"{int(value):,}"
    if key == "norm":
        return {"linf": "L-inf", "l2": "L2"}.get(str(value), str(value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def paper_table(results: list[Result], per_class: bool = False) -> PaperTable:
    """One row per model (see the module's docstring); ``per_class``: each column's worst class beside it."""
    rows: dict[str, dict[str, Any]] = {}
    settings: dict[str, dict[str, Any]] = {}
    notes: list[str] = []
    groups = _groups(results)
    names = [next((results[i].name for i in g if results[i].name), "") or results[g[0]].label for g in groups]
    for g, name in zip(groups, names):
        if names.count(name) > 1:  # two models of one name: their hashes tell them apart
            sha = next((k[4:12] for i in g for k in sorted(results[i].keys) if k.startswith("sha:")), "")
            name = f"{name} ({sha or results[g[0]].label})"
        mine: list[str] = []
        for i in g:
            r = results[i]
            values, sets = _columns(r, per_class)
            if not values:
                continue
            target = next((lab for lab in mine if all(_same(rows[lab].get(k, v), v) for k, v in values.items())
                           and all(_same(settings[lab].get(k, v), v) for k, v in sets.items())), None)
            if target is None:
                target = name if not mine else f"{name} [{r.label}]"
                if mine:
                    notes.append(f"{target}: {r.label} measured {name} again with other results or settings; "
                                 "its own row keeps both")
                rows[target], settings[target] = {}, {}
                mine.append(target)
            rows[target].update(values)
            settings[target].update(sets)
    table = pd.DataFrame.from_dict(rows, orient="index")
    header: list[str] = []
    varying = [k for k in (*CERT_SETTINGS, *ATTACK_SETTINGS)
               if len({_fmt_setting(k, s[k]) for s in settings.values() if k in s}) > 1]
    for k in varying:
        table[k] = [_fmt_setting(k, settings[lab][k]) if k in settings[lab] else "-" for lab in table.index]
    cert = {k: _fmt_setting(k, s[k]) for s in settings.values() for k in CERT_SETTINGS if k in s and k not in varying}
    if cert:
        header.append("Certified accuracy at L2 radius r (randomized smoothing): "
                      + ", ".join(f"{k}={v}" for k, v in cert.items()))
    attack = {k: _fmt_setting(k, s[k]) for s in settings.values() for k in ATTACK_SETTINGS if k in s and k not in varying}
    if attack:
        header.append("Attacks: " + ", ".join(f"{k}={v}" for k, v in attack.items()))
    if "n" in varying:
        notes.append("rows certified with different n sit side by side: a smaller n caps the radius a row can reach "
                     "(sigma * Phi^-1(alpha^(1/n))) and lowers its accuracy at every radius")
    if "sigma" in varying:
        notes.append("rows certified at different sigma sit side by side: each row's radii hold for its own sigma")
    if "eps" in varying or "norm" in varying:
        notes.append("rows attacked with different budgets sit side by side: their PGD/AutoAttack columns differ in eps")
    header.append("accuracy and abstention in %, ACR in L2 radius units; '-': not measured (no such result, or beyond a certification's reach)")
    if per_class:
        header.append("'worst X': X of the worst class (the lowest per-class accuracy or ACR; '-': no per-class counts)")
    if not table.empty:
        table = table[sorted(table.columns, key=_order)]
    return PaperTable(table, header, notes)


def _cell(col: str, v: Any) -> str:
    if isinstance(v, str):
        return v
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{float(v):.3f}" if col in ("ACR", "worst ACR") else f"{100 * float(v):.1f}"


def to_markdown(paper: PaperTable) -> str:
    cols = list(paper.table.columns)
    lines = [f"**{h}**" if i == 0 else h for i, h in enumerate(paper.header)]
    lines += ["", "| model | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    lines += ["| " + str(name) + " | " + " | ".join(_cell(c, row[c]) for c in cols) + " |"
              for name, row in paper.table.iterrows()]
    lines += [f"note: {n}" for n in paper.notes]
    return "\n".join(lines)


def _tex(s: Any) -> str:
    return str(s).replace("\\", r"\textbackslash{}").replace("_", r"\_").replace("%", r"\%").replace("&", r"\&") \
        .replace("#", r"\#")


def to_latex(paper: PaperTable) -> str:
    cols = list(paper.table.columns)
    head = ["Model", *[f"$r={c[2:]}$" if c.startswith("r=") else ("$\\sigma$" if c == "sigma" else _tex(c)) for c in cols]]
    lines = [f"% {h}" for h in paper.header]
    lines += [r"\begin{tabular}{l" + "r" * len(cols) + "}", r"\toprule", " & ".join(head) + r" \\", r"\midrule"]
    lines += [" & ".join([_tex(name), *(_tex(_cell(c, row[c])).replace("-", "--") if _cell(c, row[c]) == "-"
                                        else _tex(_cell(c, row[c])) for c in cols)]) + r" \\"
              for name, row in paper.table.iterrows()]
    lines += [r"\bottomrule", r"\end{tabular}"] + [f"% note: {n}" for n in paper.notes]
    return "\n".join(lines)


__all__ = ["PaperTable", "Result", "model_name", "paper_table", "to_latex", "to_markdown"]
