"""RobustBench's numbers from rayrcm's results (pandas only): the mean corruption error and a model
card in RobustBench's JSON format.

* **mCE** (Hendrycks & Dietterich; RobustBench ``robustbench/eval.py:210-214`` at 78fcc9e): for each
  corruption ``c`` of ImageNet-C, ``CE_c = sum_s err(c, s) / sum_s err_AlexNet(c, s)`` over severities
  1-5, and ``mCE = mean_c CE_c``. The AlexNet errors are RobustBench's own evaluation of torchvision's
  AlexNet (the ``AlexNet`` row of ``model_info/imagenet/corruptions/unaggregated_results.csv``), kept
  here as the mean error over the five severities (``sum_s`` is five times it). RobustBench computes
  mCE for ImageNet-C only.
* **Corruption accuracy**: the unweighted mean over the 15 corruptions x 5 severities
  (``eval.py:183``); on released sets only (``cifar10-c``, ``cifar100-c``, ``imagenet-c``), never
  on corruptions generated here.
* **Model card** (``robustbench/utils.py`` ``ModelInfo``/``update_json``, and the files under
  ``model_info/<dataset>/<threat model>/``): accuracies as percent strings with two decimals, ``eps``
  as RobustBench writes it (``"8/255"``; ``null`` for corruptions), the fields a user must fill
  (``link``, ``authors``, ``venue``) left empty.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from rayrcm.analysis.robustness import (
    ALEXNET_ERROR,
    CORRUPTIONS,
    NONE,
    SEVERITIES,
    corruption_errors,
    mean_corruption_error,
    released_cells,
)

RELEASED = {"cifar10-c": "cifar10", "cifar100-c": "cifar100", "imagenet-c": "imagenet"}  # our set -> RobustBench's dataset
FIELDS = ("link", "name", "authors", "additional_data", "number_forward_passes", "dataset", "venue", "architecture", "eps",
          "clean_acc", "reported")  # the fields every RobustBench model card has, in its order


def missing_cells(table: pd.DataFrame, set_: str) -> list[str]:
    cells = released_cells(table, set_)
    return [f"{c}/{s}" for c in CORRUPTIONS for s in SEVERITIES if (c, s) not in cells.index]


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def _eps(eps: float) -> str:
    k = eps * 255
    return f"{round(k)}/255" if abs(k - round(k)) < 1e-6 else f"{eps:g}"


def clean_accuracy(table: pd.DataFrame) -> float | None:
    clean = table[(table["corruption"] == NONE) & (table["attack"] == NONE) & ~table["set"].isin(list(RELEASED))
                  & ~table["set"].astype(str).str.contains("generated")]
    clean = clean[~clean["set"].isin(["cifar10.1", "imagenet-sketch", "stylized-imagenet", "imagenet-r"])]
    if not len(clean):
        return None
    return float(clean["correct"].sum() / max(int(clean["images"].sum()), 1))


def robustbench_cards(table: pd.DataFrame, protocol: dict[str, Any], *, name: str, architecture: str,
                      dataset: str = "") -> dict[str, dict[str, Any]]:
    """``{threat model: card}``: ``Linf`` when the standard AutoAttack was run (``aa``), ``corruptions``
    when a released corruption set was evaluated at all 15 corruptions x 5 severities (with ``corruptions_mce``
    for ImageNet-C). ``dataset``: RobustBench's name (default from the protocol: cifar10, cifar100).
    A result with neither is a one-line ``ValueError``, as is a corruption set that misses cells."""
    clean = clean_accuracy(table)
    base = {"link": "", "name": name, "authors": "", "additional_data": False, "number_forward_passes": 1,
            "dataset": dataset or {"cifar10": "cifar10", "cifar100": "cifar100"}.get(str(protocol.get("dataset")), ""),
            "venue": "", "architecture": architecture, "eps": None,
            "clean_acc": _pct(clean) if clean is not None else None, "reported": ""}
    cards: dict[str, dict[str, Any]] = {}
    aa = table[(table["attack"] == "aa") & (table["corruption"] == NONE) & ~table["set"].isin(list(RELEASED))]
    if len(aa):
        if protocol.get("norm", "linf") != "linf":
            raise ValueError(f"AutoAttack ran under norm {protocol.get('norm')!r}; RobustBench's Linf card needs L-inf")
        cards["Linf"] = {**base, "eps": _eps(float(protocol.get("eps", 8 / 255))),
                         "autoattack_acc": _pct(float(aa["correct"].sum() / max(int(aa["images"].sum()), 1))),
                         "footnote": f"rayrcm evaluate: AutoAttack (standard) on {int(aa['images'].sum())} test images, "
                                     f"seed {protocol.get('seed', 0)}"}
    for set_, rb_dataset in RELEASED.items():
        if not len(released_cells(table, set_)):
            continue
        gaps = missing_cells(table, set_)
        if gaps:
            raise ValueError(f"{set_}: RobustBench's corruption accuracy averages its 15 corruptions x 5 severities; "
                             f"{len(gaps)} of 75 are missing (e.g. {', '.join(gaps[:3])})")
        cells = released_cells(table, set_)
        acc = float((cells["correct"] / cells["images"].clip(lower=1)).mean())
        card = {**base, "dataset": base["dataset"] or rb_dataset, "corruptions_acc": _pct(acc),
                "footnote": f"rayrcm evaluate: {set_}, {int(cells['images'].iloc[0])} images per corruption and severity"}
        if set_ == "imagenet-c":
            card["corruptions_mce"] = _pct(mean_corruption_error(table)[0])  # type: ignore[index]
        cards["corruptions"] = card
    if not cards:
        generated = table["generated"].astype(bool).any()
        raise ValueError("holds no standard AutoAttack and no released corruption set"
                         + (" (its corruptions were generated here; RobustBench ranks the released sets)" if generated else ""))
    for card in cards.values():
        if not card["dataset"]:
            raise ValueError(f"dataset {protocol.get('dataset')!r} is not one of RobustBench's; say which with --dataset "
                             "(cifar10, cifar100, imagenet)")
    return cards


__all__ = ["ALEXNET_ERROR", "CORRUPTIONS", "FIELDS", "corruption_errors", "mean_corruption_error", "missing_cells",
           "robustbench_cards"]
