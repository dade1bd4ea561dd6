"""``rayrcm compare``: result folders written by the evaluation job's and the certification job's own
writers, and MLflow runs holding them (a real sqlite store), side by side; every cell of the printed
tables equals what the rows say. Bad input is one line."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from helpers import fails_in_one_line

from rayrcm.analysis.robustness import write_outputs
from rayrcm.cli import main

CORRUPTIONS = ("contrast", "fog")


def _cell(set_, corruption, severity, attack, images, correct, generated=False):
    return {"model": "m", "set": set_, "corruption": corruption, "severity": severity, "generated": generated,
            "attack": attack, "images": images, "correct": correct}


def _eval_dir(root, name, rows, model="m", sha="", eps=8 / 255):
    """An evaluation folder as the job writes it: the rows through its own writer, and a protocol
    (the model's reference in every cell, its file hash and the attack budget in the protocol)."""
    from rayrcm.analysis.robustness import results_table

    out = root / name
    write_outputs(results_table(pd.DataFrame([{**r, "model": model} for r in rows])), out, name)
    proto = {"dataset": "digits", "seed": 0, "model_sha256": sha or model.encode().hex().ljust(64, "0")[:64],
             "norm": "linf", "eps": eps, "pgd_steps": 20, "step_size": 2 / 255, "model": model}
    (out / "protocol.json").write_text(json.dumps(proto))
    return out


def _seed001_rows(rng):
    rows = [_cell("digits", "none", 0, "none", 100, int(rng.integers(60, 100))),
            _cell("digits", "none", 0, "pgd20", 100, int(rng.integers(10, 60))),
            _cell("digits", "none", 0, "aa", 100, int(rng.integers(0, 10)))]
    for c in CORRUPTIONS:
        for s in (1, 3, 5):
            for _ in range(2):  # two shards per cell
                rows.append(_cell("digits-c-generated", c, s, "none", 50, int(rng.integers(0, 50)), True))
    return rows


def _seed004_rows(rng):
    rows = [_cell("imagenet100", "none", 0, "none", 200, int(rng.integers(100, 200)))]
    rows += [_cell("imagenet-c", c, s, "none", 200, int(rng.integers(0, 200))) for c in CORRUPTIONS for s in (1, 5)]
    rows += [_cell(name, "none", 0, "none", n, int(rng.integers(0, n)))
             for name, n in (("imagenet-sketch", 150), ("stylized-imagenet", 90), ("imagenet-r", 120))]
    return rows


def _certify_dir(root, name, sigma=0.25, n=1000, alpha=0.001, images=40, seed=0, model="m.pt", sha="0" * 64):
    """A certification folder as the job writes it: Parquet parts (write_part) and protocol_dict, with
    the model reference added as the job's start adds it."""
    from rayrcm.certify.protocol import CertifyConfig, protocol_dict
    from rayrcm.result_parts import write_part

    rng = np.random.default_rng(seed)
    out = root / name
    recs = [{"idx": i, "label": int(rng.integers(0, 10)), "predict": int(rng.integers(-1, 10)),
             "radius": float(rng.uniform(0, 0.6)), "correct": int(rng.integers(0, 2)), "time": 0.01}
            for i in range(images)]
    write_part(out / "rows", recs[:25])
    write_part(out / "rows", recs[25:])
    cfg = CertifyConfig(model=model)
    cfg = replace(cfg, smoothing=replace(cfg.smoothing, sigma=sigma, n=n, alpha=alpha))
    proto = protocol_dict(cfg, dataset="digits", model_sha256=sha, num_classes=10, indices=list(range(images)))
    (out / "protocol.json").write_text(json.dumps({**proto, "model": model}))
    return out, pd.DataFrame(recs)


def parse(md: str) -> tuple[list[str], dict[str, dict[str, str]], list[str]]:
    """``(header lines, {row: {column: cell text}}, notes)`` of the printed Markdown."""
    header, rows, notes, head = [], {}, [], None
    for line in md.splitlines():
        if line.startswith("| model |"):
            head = [c.strip() for c in line.strip("|").split("|")][1:]
        elif line.startswith("|") and head and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = dict(zip(head, cells[1:]))
        elif line.startswith("note: "):
            notes.append(line[len("note: "):])
        elif line.strip() and head is None and not line.startswith("["):
            header.append(line.strip("*"))
    return header, rows, notes


def _acc(rows, **match):
    sel = [r for r in rows if all(r[k] == v for k, v in match.items())]
    return sum(r["correct"] for r in sel) / sum(r["images"] for r in sel)


def _pct(x):
    return f"{100 * x:.1f}"


def test_compare_gives_one_row_per_model_robustness_and_certification_side_by_side(tmp_path, capsys):
    """An evaluation and a certification of one model (one file hash) are one row, named after the
    model; another model is another row; every cell is the rows' value in percent; ACR and abstention
    are kept; the settings every row shares are in the header; LaTeX holds the same numbers."""
    rng = np.random.default_rng(0)
    r1, r4 = _seed001_rows(rng), _seed004_rows(rng)
    acl = "models:/acl-digits@slf"
    a = _eval_dir(tmp_path, "acl-slf-eval", r1, model=acl, sha="a" * 64)
    b = _eval_dir(tmp_path, "in100", r4, model="/models/in100/model.pt", sha="b" * 64)
    c, cert = _certify_dir(tmp_path, "smooth-0.25", model=acl, sha="a" * 64)
    with pytest.raises(SystemExit) as exit_:
        main(["compare", str(a), str(b), str(c), "--latex", "--out", str(tmp_path / "cmp" / "table.md")])
    assert exit_.value.code == 0
    printed = capsys.readouterr().out
    header, rows, notes = parse(printed.split("\\begin{tabular}")[0])
    assert list(rows) == ["acl-digits@slf", "in100"] and notes == []
    assert header[0] == "Certified accuracy at L2 radius r (randomized smoothing): sigma=0.25, n=1,000, alpha=0.001, sampling=fixed"
    assert header[1] == "Attacks: eps=8/255, norm=L-inf, pgd_steps=20, step_size=2/255" and "abstention in %" in header[2]
    row = rows["acl-digits@slf"]
    assert list(row)[:3] == ["SA", "PGD-20", "AutoAttack (standard)"]
    assert row["SA"] == _pct(_acc(r1, set="digits", attack="none")) and row["PGD-20"] == _pct(_acc(r1, attack="pgd20"))
    assert row["AutoAttack (standard)"] == _pct(_acc(r1, attack="aa"))
    for s in (1, 3, 5):
        assert row[f"CS-{s} (generated)"] == _pct(np.mean([_acc(r1, corruption=k, severity=s) for k in CORRUPTIONS]))
    assert row["CS-1"] == row["CS-5"] == "-"  # in100's released corruptions: not measured for this model
    radii = [k for k in row if k.startswith("r=")]
    assert radii == ["r=0.00", "r=0.25", "r=0.50"]  # n=1000: reach 0.615
    for col in radii:
        assert row[col] == _pct(np.mean((cert["correct"] == 1) & (cert["radius"] >= float(col[2:])))), col
    assert row["ACR"] == f"{np.mean(cert['radius'] * cert['correct']):.3f}"
    assert row["abstain"] == _pct(np.mean(cert["predict"] == -1)) and list(row)[-2:] == ["ACR", "abstain"]
    other = rows["in100"]
    assert other["SA"] == _pct(_acc(r4, set="imagenet100")) and other["PGD-20"] == other["r=0.00"] == "-"
    assert other["C"] == _pct(np.mean([_acc(r4, corruption=k, severity=s) for k in CORRUPTIONS for s in (1, 5)]))
    for name, col in (("imagenet-sketch", "Sketch"), ("imagenet-r", "R")):
        assert other[col] == _pct(_acc(r4, set=name))
    assert "clean" not in other  # SA is the clean column
    assert parse((tmp_path / "cmp" / "table.md").read_text()) == (header, rows, notes)
    tex = (tmp_path / "cmp" / "table.tex").read_text()
    line = next(t for t in tex.splitlines() if t.startswith("acl-digits@slf"))
    cols = list(row)
    cells = [x.strip().rstrip("\\").strip() for x in line.split("&")[1:]]
    assert [c.replace("--", "-") for c in cells] == [row[k] for k in cols]  # the same units as Markdown
    assert "$r=0.25$" in tex and "CS-3 (generated)" in tex and "% accuracy and abstention in %" in tex


def test_settings_that_differ_become_columns_with_a_note_and_a_second_result_its_own_row(tmp_path, capsys):
    from rayrcm.orchestration.analyze import compare

    a, _ = _certify_dir(tmp_path, "m1-s025", sigma=0.25, n=1000, model="/w/m1/model.pt", sha="1" * 64, seed=1)
    b, _ = _certify_dir(tmp_path, "m2-s050", sigma=0.5, n=100000, model="/w/m2/model.pt", sha="2" * 64, seed=2)
    c, _ = _certify_dir(tmp_path, "m1-s050", sigma=0.5, n=1000, model="/w/m1/model.pt", sha="1" * 64, seed=3)
    paper = compare([str(a), str(b), str(c)])
    header, rows, notes = parse(capsys.readouterr().out)
    assert list(rows) == ["m1", "m1 [m1-s050]", "m2"]  # m1 certified twice: nothing overwritten, its rows together
    assert [rows[k]["sigma"] for k in rows] == ["0.25", "0.5", "0.5"] and [rows[k]["n"] for k in rows] == ["1,000", "1,000", "100,000"]
    assert header[0] == "Certified accuracy at L2 radius r (randomized smoothing): alpha=0.001, sampling=fixed"
    assert any("different n" in n for n in notes) and any("different sigma" in n for n in notes)
    assert any(n.startswith("m1 [m1-s050]: m1-s050 measured m1 again") for n in notes)
    assert list(paper.table.index) == list(rows)
    same = _certify_dir(tmp_path, "m1-again", sigma=0.25, n=1000, model="/w/m1/model.pt", sha="1" * 64, seed=1)[0]
    assert list(compare([str(a), str(same)]).table.index) == ["m1"]  # the same result twice: one row


def test_compare_reads_mlflow_runs_as_their_folders_and_joins_a_model_to_its_runs(tmp_path, capsys):
    """By run id (a real sqlite store): the same rows as by folder; a fine-tuning run's metrics are its
    model's row, and a certification run that is its child joins that row; a chain with several
    modes gives a row per mode."""
    from mlflow.tracking import MlflowClient

    from rayrcm.orchestration import tracking
    from rayrcm.orchestration.analyze import compare

    rng = np.random.default_rng(1)
    a = _eval_dir(tmp_path, "acl-slf", _seed001_rows(rng), model="models:/acl@slf", sha="a" * 64)
    c, cert = _certify_dir(tmp_path, "smooth-0.25", seed=2, model="models:/rcm@sigma-0_25", sha="c" * 64)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    client.create_experiment("cmp", artifact_location=(tmp_path / "artifacts").as_uri())
    rcm = tracking.start_job_run(uri, "cmp", "rcm-finetune", {})  # the fine-tuned model's own run
    for k, v in {"test_sa": 0.8, "test_pgd20": 0.4, "test_robust_images": 20}.items():
        client.log_metric(rcm, k, v)
    tracking.end_run(uri, rcm, ok=True)
    runs = []
    for folder, files, parent in ((a, ["results.parquet", "protocol.json"], None), (c, ["protocol.json", "rows"], rcm)):
        run = tracking.start_job_run(uri, "cmp", folder.name, {}, parent_run_id=parent)
        tracking.log_artifacts(uri, run, [folder / f for f in files])
        tracking.end_run(uri, run, ok=True)
        runs.append(run)
    chain = tracking.start_job_run(uri, "cmp", "acl-finetune", {})  # the chain's metrics: one model per mode
    for k, v in {"slf_sa": 0.8, "slf_pgd20": 0.4, "slf_aa_apgd": 0.35, "slf_aa": 0.3, "slf_robust_images": 20,
                 "aff_sa": 0.75, "aff_pgd20": 0.45, "aff_aa_apgd": 0.4, "aff_aa": 0.4, "aff_robust_images": 20}.items():
        client.log_metric(chain, k, v)
    tracking.end_run(uri, chain, ok=True)
    by_folder = compare([str(a), str(c)]).table
    by_run = compare([rcm, *runs, chain], tracking_uri=uri).table
    capsys.readouterr()
    assert list(by_folder.index) == ["acl@slf", "rcm@sigma-0_25"]
    assert list(by_run.index) == ["rcm-finetune", "acl@slf", "acl-finetune/slf", "acl-finetune/aff"]
    assert by_run.loc["acl@slf"].dropna().equals(by_folder.loc["acl@slf"].dropna())
    radii = [k for k in by_folder.columns if k.startswith("r=")] + ["ACR", "abstain"]
    assert by_run.loc["rcm-finetune", radii].equals(by_folder.loc["rcm@sigma-0_25", radii])  # joined to its model's run
    assert by_run.loc["rcm-finetune", "SA"] == pytest.approx(0.8)
    assert by_run.loc["rcm-finetune", "ACR"] == pytest.approx(np.mean(cert["radius"] * cert["correct"]))
    assert by_run.loc["acl-finetune/aff", "AutoAttack (standard)"] == pytest.approx(0.4)
    assert by_run.loc["acl-finetune/slf", "APGD-CE+APGD-T (upper bound)"] == pytest.approx(0.35)


@pytest.mark.parametrize("argv,needle", [
    (["compare", "no/such/folder"], "no such result folder or file, and not an MLflow run id"),
    (["compare", "{tmp}", "--radii", "0,x"], "comma-separated numbers"),
])
def test_bad_input_is_one_line(tmp_path, capsys, argv, needle):
    fails_in_one_line(capsys, [a.replace("{tmp}", str(tmp_path)) for a in argv], needle)


def test_a_folder_that_holds_no_result_is_one_line(tmp_path, capsys):
    fails_in_one_line(capsys, ["compare", str(tmp_path)], "not a result folder")


def test_per_class_puts_the_worst_class_beside_each_column(tmp_path, capsys):
    """``--per-class``: an evaluation's worst class (from its per-class counts) beside SA and PGD, a
    certification's beside each radius and ACR, each the minimum over the classes computed here."""
    from rayrcm.analysis.per_class import evaluation_classes

    rng = np.random.default_rng(3)
    shards = []
    for attack in ("none", "pgd20"):
        counts = {str(c): [10, int(rng.integers(0, 11))] for c in range(3)}
        shards.append({**_cell("digits", "none", 0, attack, 30, sum(v[1] for v in counts.values())),
                       "per_class": json.dumps(counts)})
    a = _eval_dir(tmp_path, "eval", [{k: v for k, v in r.items() if k != "per_class"} for r in shards],
                  model="models:/m@x", sha="a" * 64)
    classes = evaluation_classes(pd.DataFrame(shards), "models:/m@x")
    classes.to_csv(a / "per_class.csv", index=False)
    c, cert = _certify_dir(tmp_path, "cert", model="models:/m@x", sha="a" * 64, images=60)
    with pytest.raises(SystemExit):
        main(["compare", str(a), str(c), "--per-class"])
    _, rows, _ = parse(capsys.readouterr().out)
    row = rows["m@x"]
    for attack, col in (("none", "SA"), ("pgd20", "PGD-20")):
        per = [json.loads(s["per_class"]) for s in shards if s["attack"] == attack][0]
        assert row[f"worst {col}"] == _pct(min(v[1] / v[0] for v in per.values()))
        assert list(row).index(f"worst {col}") == list(row).index(col) + 1
    for r in ("0.00", "0.25", "0.50"):
        per = [np.mean((g["correct"] == 1) & (g["radius"] >= float(r))) for _, g in cert.groupby("label")]
        assert row[f"worst r={r}"] == _pct(min(per))
    assert row["worst ACR"] == f"{min(np.mean(g['radius'] * g['correct']) for _, g in cert.groupby('label')):.3f}"
    with pytest.raises(SystemExit):
        main(["compare", str(a), str(c)])
    assert not [k for k in parse(capsys.readouterr().out)[1]["m@x"] if k.startswith("worst")]
