"""RobustBench's numbers: the mean corruption error against a hand computation with RobustBench's
formula and AlexNet baseline; ``rayrcm export-results --format robustbench`` on evaluation folders
written by the job's own writer, checked against the fields RobustBench's ``ModelInfo`` reads and the
types its files hold (percent strings, ``eps`` as "8/255"); bad input one line."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from helpers import fails_in_one_line

from rayrcm.analysis.leaderboard import FIELDS, robustbench_cards
from rayrcm.analysis.robustness import (
    ALEXNET_ERROR,
    CORRUPTIONS,
    headline,
    mean_corruption_error,
    results_table,
    write_outputs,
)
from rayrcm.cli import main

# robustbench/utils.py ModelInfo (78fcc9e), plus the two keys its files carry beyond it
MODEL_INFO = {"link", "name", "authors", "additional_data", "number_forward_passes", "dataset", "venue", "architecture",
              "eps", "clean_acc", "reported", "corruptions_acc", "corruptions_acc_3d", "corruptions_mce",
              "corruptions_mce_3d", "autoattack_acc", "footnote", "unreliable", "external"}
PERCENT = ("clean_acc", "autoattack_acc", "corruptions_acc", "corruptions_mce")


def _cell(set_, corruption, severity, attack, images, correct, generated=False):
    return {"model": "m", "set": set_, "corruption": corruption, "severity": severity, "generated": generated,
            "attack": attack, "images": images, "correct": correct}


def _corrupted(set_, rng, images=200, corruptions=CORRUPTIONS):
    return [_cell(set_, c, s, "none", images, int(rng.integers(0, images))) for c in corruptions for s in range(1, 6)]


def _folder(tmp_path, name, rows, dataset="cifar10"):
    out = tmp_path / name
    write_outputs(results_table(pd.DataFrame(rows)), out, name)
    (out / "protocol.json").write_text(json.dumps({"dataset": dataset, "seed": 0, "model_sha256": "a" * 64, "norm": "linf",
                                                   "eps": 8 / 255, "model": "models:/me@robust"}))
    return out


def test_mce_is_robustbenchs_formula_with_its_alexnet_baseline():
    """CE_c = sum_s err(c, s) / sum_s err_AlexNet(c, s); mCE = mean over corruptions. A model with
    AlexNet's errors scores 100 %, one with half of them 50 %; any other is the hand computation."""
    alex = [_cell("imagenet-c", c, s, "none", 10_000, round(10_000 * (1 - ALEXNET_ERROR[c]))) for c in CORRUPTIONS
            for s in range(1, 6)]
    assert mean_corruption_error(results_table(pd.DataFrame(alex))) == (pytest.approx(1.0, abs=1e-4), 15)
    half = [{**r, "correct": round(10_000 * (1 - ALEXNET_ERROR[r["corruption"]] / 2))} for r in alex]
    assert mean_corruption_error(results_table(pd.DataFrame(half)))[0] == pytest.approx(0.5, abs=1e-4)
    rng = np.random.default_rng(0)
    rows = _corrupted("imagenet-c", rng)
    want = np.mean([sum(1 - r["correct"] / r["images"] for r in rows if r["corruption"] == c) / (5 * ALEXNET_ERROR[c])
                    for c in CORRUPTIONS])
    table = results_table(pd.DataFrame(rows))
    assert mean_corruption_error(table) == (pytest.approx(want), 15) and headline(table)["mCE"] == pytest.approx(want)
    partial = results_table(pd.DataFrame([r for r in rows if r["corruption"] in ("fog", "snow")]
                                         + [_cell("imagenet-c", "frost", 1, "none", 10, 5)]))  # frost: one severity only
    assert mean_corruption_error(partial)[1] == 2 and "mCE (2/15)" in headline(partial)
    assert mean_corruption_error(results_table(pd.DataFrame(_corrupted("cifar10-c", rng)))) is None  # ImageNet-C only


def test_export_writes_robustbench_cards_with_the_fields_it_reads(tmp_path, capsys):
    rng = np.random.default_rng(1)
    clean = [_cell("cifar10", "none", 0, "none", 1000, 912), _cell("cifar10", "none", 0, "pgd20", 1000, 530),
             _cell("cifar10", "none", 0, "aa-apgd", 1000, 495), _cell("cifar10", "none", 0, "aa", 1000, 488)]
    corrupted = _corrupted("cifar10-c", rng, images=1000)
    folder = _folder(tmp_path, "eval-me", clean + corrupted)
    with pytest.raises(SystemExit) as exit_:
        main(["export-results", str(folder), "--format", "robustbench", "--name", "Me2026Robust", "--architecture",
              "ResNet-18", "--out", str(tmp_path / "rb")])
    assert exit_.value.code == 0
    linf = json.loads((tmp_path / "rb" / "cifar10" / "Linf" / "Me2026Robust.json").read_text())
    corr = json.loads((tmp_path / "rb" / "cifar10" / "corruptions" / "Me2026Robust.json").read_text())
    for card in (linf, corr):
        assert set(card) <= MODEL_INFO and list(card)[:len(FIELDS)] == list(FIELDS)
        assert card["dataset"] == "cifar10" and card["architecture"] == "ResNet-18" and card["name"] == "Me2026Robust"
        assert isinstance(card["additional_data"], bool) and card["number_forward_passes"] == 1
        for key in PERCENT:
            if key in card:
                assert isinstance(card[key], str) and card[key] == f"{float(card[key]):.2f}"
    assert linf["eps"] == "8/255" and corr["eps"] is None
    assert linf["clean_acc"] == corr["clean_acc"] == "91.20" and linf["autoattack_acc"] == "48.80"  # AA, not APGD
    want = np.mean([r["correct"] / r["images"] for r in corrupted])
    assert corr["corruptions_acc"] == f"{100 * want:.2f}" and "corruptions_mce" not in corr  # no mCE for CIFAR
    out = capsys.readouterr().out
    assert "Linf, clean 91.20, AutoAttack 48.80" in out and "fill in link, authors and venue" in out

    imagenet = _folder(tmp_path, "eval-in", [_cell("imagefolder", "none", 0, "none", 500, 380)]
                       + _corrupted("imagenet-c", rng, images=500), dataset="imagefolder")
    with pytest.raises(SystemExit) as exit_:  # ImageNet-C says the dataset; its card carries RobustBench's mCE
        main(["export-results", str(imagenet), "--out", str(tmp_path / "rb")])
    assert exit_.value.code == 0
    card = json.loads((tmp_path / "rb" / "imagenet" / "corruptions" / "me_robust.json").read_text())
    table = pd.read_parquet(imagenet / "results.parquet")
    assert card["corruptions_mce"] == f"{100 * mean_corruption_error(table)[0]:.2f}" and card["clean_acc"] == "76.00"
    attacked = _folder(tmp_path, "eval-aa", [_cell("imagefolder", "none", 0, "aa", 500, 200)], dataset="imagefolder")
    fails_in_one_line(capsys, ["export-results", str(attacked), "--out", str(tmp_path / "rb")],
                      "dataset 'imagefolder' is not one of RobustBench's; say which with --dataset")
    assert robustbench_cards(pd.read_parquet(attacked / "results.parquet"), {"dataset": "imagefolder"}, name="x",
                             architecture="ResNet-50", dataset="imagenet")["Linf"]["dataset"] == "imagenet"


@pytest.mark.parametrize("rows, needle", [
    ([_cell("cifar10", "none", 0, "none", 100, 90), _cell("cifar10", "none", 0, "aa-apgd", 100, 40)],
     "holds no standard AutoAttack and no released corruption set"),
    ([_cell("cifar10", "none", 0, "none", 100, 90)] + [_cell("cifar10-c-generated", "fog", 1, "none", 100, 50, True)],
     "its corruptions were generated here; RobustBench ranks the released sets"),
    ([_cell("cifar10", "none", 0, "none", 100, 90)] + [_cell("cifar10-c", c, s, "none", 100, 50) for c in ("fog", "snow")
                                                      for s in range(1, 6)],
     "cifar10-c: RobustBench's corruption accuracy averages its 15 corruptions x 5 severities; 65 of 75 are missing"),
])
def test_results_a_card_cannot_hold_are_one_line(tmp_path, capsys, rows, needle):
    folder = _folder(tmp_path, "eval", rows)
    fails_in_one_line(capsys, ["export-results", str(folder), "--out", str(tmp_path / "rb")], needle)


def test_an_unknown_format_and_a_certification_folder_are_one_line(tmp_path, capsys):
    folder = _folder(tmp_path, "eval", [_cell("cifar10", "none", 0, "aa", 100, 40)])
    fails_in_one_line(capsys, ["export-results", str(folder), "--format", "onnx"], "--format='onnx' is invalid")
    assert not (tmp_path / "robustbench").exists()
