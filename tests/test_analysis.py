"""Certified accuracy, ACR, tables and plots; Cohen-format files round-trip."""

from __future__ import annotations

import pandas as pd
import pytest

from rayrcm.analysis import (
    abstention_rate,
    average_certified_radius,
    certified_accuracy,
    default_radii,
    plot_curves,
    read_results,
    summary_metrics,
    summary_table,
    to_latex,
    to_markdown,
    write_cohen_tsv,
)


def _rows():
    # idx, label, predict, radius, correct, time
    return pd.DataFrame({
        "idx": [0, 20, 40, 60, 80],
        "label": [3, 1, 4, 1, 5],
        "predict": [3, 1, -1, 2, 5],
        "radius": [0.9123456789, 0.3, 0.0, 0.8, 0.25],
        "correct": [1, 1, 0, 0, 1],
        "time": [1.5, 2.25, 3600.0 + 61.5, 0.1, 90000.0],
    })


def test_certified_accuracy_acr_and_abstention_by_hand():
    df = _rows()
    acc = certified_accuracy(df, [0.0, 0.25, 0.3, 0.5, 1.0])
    assert acc.tolist() == pytest.approx([3 / 5, 3 / 5, 2 / 5, 1 / 5, 0.0])  # wrong answers never count
    assert average_certified_radius(df) == pytest.approx((0.9123456789 + 0.3 + 0.25) / 5)
    assert abstention_rate(df) == pytest.approx(1 / 5)
    m = summary_metrics(df, [0.0, 0.5])
    assert m["certified_acc_0.00"] == pytest.approx(0.6) and m["certified_acc_0.50"] == pytest.approx(0.2) and m["images"] == 5


def test_default_radii_follow_the_papers_and_grow_with_the_results():
    assert default_radii([_rows()]) == [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0]
    big = _rows().assign(radius=[3.1, 0, 0, 0, 0])
    assert default_radii([big])[-1] == 3.25


def test_cohen_format_round_trips(tmp_path):
    df = _rows()
    path = write_cohen_tsv(df, tmp_path / "out.tsv")
    lines = path.read_text().splitlines()
    assert lines[0] == "idx\tlabel\tpredict\tradius\tcorrect\ttime"
    assert lines[3].split("\t") == ["40", "4", "-1", "0.000000", "0", "1:01:01.500000"]
    assert lines[5].split("\t")[-1] == "1 day, 1:00:00"
    back = read_results(path)
    for col in ("idx", "label", "predict", "correct"):
        assert back[col].tolist() == df[col].tolist()
    assert back["radius"].tolist() == pytest.approx(df["radius"].tolist(), abs=1e-6)
    assert (back["radius"] <= df["radius"]).all(), "text radii are rounded down, never up"
    assert back["time"].tolist() == pytest.approx(df["time"].tolist())
    assert summary_table({"a": back}).loc["a"].tolist()[:-1] == pytest.approx(summary_table({"a": df}).loc["a"].tolist()[:-1], abs=1e-6)


def test_reads_a_file_written_by_the_original_smoothing_code(tmp_path):
    # the exact layout of Cohen et al.'s certify.py output
    text = "idx\tlabel\tpredict\tradius\tcorrect\ttime\n0\t3\t3\t0.912\t1\t0:00:02.137481\n100\t8\t-1\t0.0\t0\t0:00:02.101023\n"
    (tmp_path / "sigma_0.25").write_text(text)
    df = read_results(tmp_path / "sigma_0.25")
    assert df["radius"].tolist() == [0.912, 0.0] and df["time"].tolist() == pytest.approx([2.137481, 2.101023])
    (tmp_path / "bad.tsv").write_text("a\tb\n1\t2\n")
    with pytest.raises(ValueError, match="missing columns"):
        read_results(tmp_path / "bad.tsv")


def test_tables_and_plot(tmp_path):
    table = summary_table({"rcm_b": _rows(), "cohen": _rows().assign(radius=0.1)}, [0.0, 0.25, 0.5])
    md = to_markdown(table)
    assert md.splitlines()[0] == "| run | 0.00 | 0.25 | 0.50 | ACR | abstain | images |"
    assert "| rcm_b | 0.600 | 0.600 | 0.200 | 0.292 | 0.200 | 5 |" in md
    tex = to_latex(table)
    assert r"rcm\_b & 60.0 & 60.0 & 20.0 & 0.292 & 20.0 & 5 \\" in tex and r"\toprule" in tex
    png = plot_curves({"rcm_b": _rows()}, tmp_path / "curve.png", title="t")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


_COHEN = "idx\tlabel\tpredict\tradius\tcorrect\ttime\n0\t3\t3\t0.912\t1\t0:00:02.137481\n100\t8\t-1\t0.0\t0\t0:00:02.101023\n"


def test_analyze_labels_cohen_files_by_their_whole_name(tmp_path, capsys):
    from rayrcm.orchestration.certify_job import analyze

    for name in ("sigma_0.25", "sigma_0.50"):  # Cohen et al.'s certify.py output: files without an extension
        (tmp_path / name).write_text(_COHEN)
    table, files = analyze([str(tmp_path / "sigma_0.25"), str(tmp_path / "sigma_0.50")], log=False)
    assert table.index.tolist() == ["sigma_0.25", "sigma_0.50"]
    assert [f.name for f in files] == ["table.md", "table.tex", "certified_accuracy.png", "per_class.md", "per_class.csv"]
    assert all(f.parent == tmp_path / "analysis" for f in files)


def test_analyze_labels_strip_only_result_suffixes_and_disambiguate_by_folder(tmp_path, capsys):
    from rayrcm.analysis import result_labels
    from rayrcm.orchestration.certify_job import analyze

    paths = []
    for model in ("resnet50", "resnet110"):
        (tmp_path / model).mkdir()
        paths.append(tmp_path / model / "sigma_0.25")
        paths[-1].write_text(_COHEN)
    (tmp_path / "mine.tsv").write_text(_COHEN)
    table, _ = analyze([str(p) for p in [*paths, tmp_path / "mine.tsv"]], log=False, out=tmp_path / "out")
    assert table.index.tolist() == ["resnet50/sigma_0.25", "resnet110/sigma_0.25", "mine"]
    a, b = tmp_path / "x" / "test" / "sigma_0.50", tmp_path / "y" / "test" / "sigma_0.50"
    assert result_labels([a, b, tmp_path / "r.parquet", tmp_path / "r.csv.txt"]) == [
        "x/test/sigma_0.50", "y/test/sigma_0.50", "r", "r.csv"]
    assert result_labels([a, a]) == ["sigma_0.50", "sigma_0.50#2"]


def test_per_class_certified_accuracy_acr_and_worst_class_by_hand(tmp_path, capsys):
    from rayrcm.analysis import per_class_metrics, per_class_table, worst_class

    df = _rows()  # labels 3, 1, 4, 1, 5: class 1 holds a certified image (0.3) and a wrong one
    table = per_class_table(df, [0.0, 0.25, 0.5])
    assert table.index.tolist() == [1, 3, 4, 5] and table["images"].tolist() == [2, 1, 1, 1]
    assert table.loc[1, ["0.00", "0.25", "0.50"]].tolist() == pytest.approx([0.5, 0.5, 0.0])
    assert table.loc[3, "0.50"] == 1.0 and table.loc[4, "0.00"] == 0.0 and table.loc[4, "abstain"] == 1.0
    assert table.loc[1, "ACR"] == pytest.approx(0.15) and table.loc[5, "ACR"] == pytest.approx(0.25)
    worst = worst_class(table)
    assert worst["0.00"] == 0.0 and worst["ACR"] == 0.0 and worst["abstain"] == 1.0  # class 4 abstained
    beyond = per_class_table(df, [0.0, 0.5], reach=0.4)  # beyond the protocol's reach: not measured
    assert beyond["0.50"].isna().all()
    m = per_class_metrics(df, [0.0, 0.25])
    assert m["worst_class_certified_acc_0.00"] == 0.0 and m["worst_class_acr"] == 0.0 and m["classes"] == 4
    assert per_class_metrics(df.assign(label=1), [0.0]) == {}  # one class: no worst class

    from rayrcm.orchestration.certify_job import analyze

    (tmp_path / "run").mkdir()
    write_cohen_tsv(df, tmp_path / "run" / "results.tsv")
    _, files = analyze([str(tmp_path / "run" / "results.tsv")], radii=[0.0, 0.25], log=False, per_class=True)
    out = capsys.readouterr().out
    assert "| 1 | 2 | 0.500 | 0.500 | 0.150 | 0.000 |" in out and "| worst |  | 0.000 | 0.000 | 0.000 | 1.000 |" in out
    csv = pd.read_csv(tmp_path / "run" / "analysis" / "per_class.csv")
    assert csv.columns.tolist()[:3] == ["run", "class", "images"] and len(csv) == 4
