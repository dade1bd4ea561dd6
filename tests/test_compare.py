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


def _eval_dir(root, name, rows):
    """An evaluation folder as the job writes it: the rows through its own writer, and a protocol."""
    from rayrcm.analysis.robustness import results_table

    out = root / name
    write_outputs(results_table(pd.DataFrame(rows)), out, name)
    (out / "protocol.json").write_text(json.dumps({"dataset": "digits", "seed": 0}))
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


def _certify_dir(root, name, sigma=0.25, n=1000, alpha=0.001, images=40, seed=0):
    """A certification folder as the job writes it: Parquet parts (write_part) and protocol_dict."""
    from rayrcm.certify.collect import write_part
    from rayrcm.certify.protocol import CertifyConfig, protocol_dict

    rng = np.random.default_rng(seed)
    out = root / name
    recs = [{"idx": i, "label": int(rng.integers(0, 10)), "predict": int(rng.integers(-1, 10)),
             "radius": float(rng.uniform(0, 0.6)), "correct": int(rng.integers(0, 2)), "time": 0.01}
            for i in range(images)]
    write_part(out / "rows", recs[:25])
    write_part(out / "rows", recs[25:])
    cfg = CertifyConfig(model="m.pt")
    cfg = replace(cfg, smoothing=replace(cfg.smoothing, sigma=sigma, n=n, alpha=alpha))
    proto = protocol_dict(cfg, dataset="digits", model_sha256="0" * 64, num_classes=10, indices=list(range(images)))
    (out / "protocol.json").write_text(json.dumps(proto))
    return out, pd.DataFrame(recs)


def parse(md: str) -> dict[str, dict[str, dict[str, str]]]:
    """``{table title: {row label: {column: cell text}}}`` of the printed Markdown."""
    tables, title, head = {}, None, None
    for line in md.splitlines():
        if line.startswith("**"):
            title, head = line.strip("*"), None
            tables[title] = {}
        elif line.startswith("| run |"):
            head = [c.strip() for c in line.strip("|").split("|")][1:]
        elif line.startswith("|") and head and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            tables[title][cells[0]] = dict(zip(head, cells[1:]))
    return tables


def _by_kind(tables):
    return {k.split(":")[0].split(" ")[0].lower(): v for k, v in tables.items()}


def _acc(rows, **match):
    sel = [r for r in rows if all(r[k] == v for k, v in match.items())]
    return sum(r["correct"] for r in sel) / sum(r["images"] for r in sel)


def test_compare_puts_evaluations_and_a_certification_side_by_side(tmp_path, capsys):
    rng = np.random.default_rng(0)
    r1, r4 = _seed001_rows(rng), _seed004_rows(rng)
    a, b = _eval_dir(tmp_path, "acl-slf", r1), _eval_dir(tmp_path, "in100", r4)
    c, cert = _certify_dir(tmp_path, "smooth-0.25")
    with pytest.raises(SystemExit) as exit_:
        main(["compare", str(a), str(b), str(c), "--latex", "--out", str(tmp_path / "cmp" / "table.md")])
    assert exit_.value.code == 0
    printed = capsys.readouterr().out
    t = _by_kind(parse(printed))
    assert set(t) == {"robustness", "distribution", "certified"}
    rob = t["robustness"]
    assert list(rob["acl-slf"]) == ["SA", "PGD-20", "AutoAttack (standard)", "CS-1", "CS-1 (generated)",
                                    "CS-3 (generated)", "CS-5", "CS-5 (generated)"]  # released (in100's) and generated
    assert [k for k, v in rob["acl-slf"].items() if v == "-"] == ["CS-1", "CS-5"]
    assert rob["acl-slf"]["SA"] == f"{_acc(r1, set='digits', attack='none'):.3f}"
    assert rob["acl-slf"]["PGD-20"] == f"{_acc(r1, attack='pgd20'):.3f}"
    assert rob["acl-slf"]["AutoAttack (standard)"] == f"{_acc(r1, attack='aa'):.3f}"
    for s in (1, 3, 5):
        want = np.mean([_acc(r1, corruption=k, severity=s) for k in CORRUPTIONS])
        assert rob["acl-slf"][f"CS-{s} (generated)"] == f"{want:.3f}"
    assert rob["in100"]["SA"] == f"{_acc(r4, set='imagenet100'):.3f}" and rob["in100"]["PGD-20"] == "-"
    for s in (1, 5):
        assert rob["in100"][f"CS-{s}"] == f"{np.mean([_acc(r4, corruption=k, severity=s) for k in CORRUPTIONS]):.3f}"
    shift = t["distribution"]
    assert list(shift) == ["in100"] and list(shift["in100"]) == ["clean", "C", "Sketch", "Stylized", "R"]
    c_mean = np.mean([_acc(r4, corruption=k, severity=s) for k in CORRUPTIONS for s in (1, 5)])
    assert shift["in100"]["C"] == f"{c_mean:.3f}"
    for name, col in (("imagenet-sketch", "Sketch"), ("stylized-imagenet", "Stylized"), ("imagenet-r", "R")):
        assert shift["in100"][col] == f"{_acc(r4, set=name):.3f}"
    certified = t["certified"]["smooth-0.25"]
    assert list(certified)[0] == "0.00" and "0.75" not in certified  # n=1000: reach 0.615
    for r, text in certified.items():
        assert text == f"{np.mean((cert['correct'] == 1) & (cert['radius'] >= float(r))):.3f}", r
    written = (tmp_path / "cmp" / "table.md").read_text()
    assert parse(written) == parse(printed)
    tex = (tmp_path / "cmp" / "table.tex").read_text()
    assert r"\begin{tabular}" in tex and "$r=0.25$" in tex and "CS-3 (generated)" in tex


def test_compare_reads_mlflow_runs_as_their_folders(tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from rayrcm.orchestration import tracking
    from rayrcm.orchestration.analyze import compare

    rng = np.random.default_rng(1)
    a = _eval_dir(tmp_path, "acl-slf", _seed001_rows(rng))
    c, _ = _certify_dir(tmp_path, "smooth-0.25", seed=2)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(uri).create_experiment("cmp", artifact_location=(tmp_path / "artifacts").as_uri())
    runs = []
    for folder, files in ((a, ["results.parquet", "table.md"]), (c, ["protocol.json"])):
        run = tracking.start_job_run(uri, "cmp", folder.name, {})
        tracking.log_artifacts(uri, run, [folder / f for f in files])
        if folder == c:
            tracking.log_artifacts(uri, run, [folder / "rows"])
        tracking.end_run(uri, run, ok=True)
        runs.append(run)
    ft = tracking.start_job_run(uri, "cmp", "acl-finetune", {})  # the fine-tuning chain's metrics
    for k, v in {"slf_sa": 0.8, "slf_pgd20": 0.4, "slf_aa_apgd": 0.35, "slf_aa": 0.3, "slf_robust_images": 20,
                 "aff_sa": 0.75, "aff_pgd20": 0.45, "aff_aa_apgd": 0.4, "aff_aa": 0.4, "aff_robust_images": 20}.items():
        MlflowClient(uri).log_metric(ft, k, v)
    tracking.end_run(uri, ft, ok=True)
    by_folder = compare([str(a), str(c)])
    by_run = compare(runs + [ft], tracking_uri=uri)
    capsys.readouterr()
    rob = by_run["robustness"]
    assert rob.loc["acl-slf"].dropna().equals(by_folder["robustness"].loc["acl-slf"].dropna())
    assert by_run["certified"].loc["smooth-0.25"].equals(by_folder["certified"].loc["smooth-0.25"])
    assert rob.loc["acl-finetune/slf", "SA"] == pytest.approx(0.8)
    assert rob.loc["acl-finetune/aff", "AutoAttack (standard)"] == pytest.approx(0.4)
    assert rob.loc["acl-finetune/slf", "APGD-CE+APGD-T (upper bound)"] == pytest.approx(0.35)


@pytest.mark.parametrize("argv,needle", [
    (["compare", "no/such/folder"], "no such result folder or file, and not an MLflow run id"),
    (["compare", "{tmp}", "--radii", "0,x"], "comma-separated numbers"),
])
def test_bad_input_is_one_line(tmp_path, capsys, argv, needle):
    fails_in_one_line(capsys, [a.replace("{tmp}", str(tmp_path)) for a in argv], needle)


def test_a_folder_that_holds_no_result_is_one_line(tmp_path, capsys):
    fails_in_one_line(capsys, ["compare", str(tmp_path)], "not a result folder")
