"""The robustness evaluation job (``rayrcm evaluate``) on a real local Ray cluster: clean accuracy is
a plain PyTorch loop's, generated-corruption and attack rows do not depend on the number of actors,
a partial run resumes computing only the missing shards, released CIFAR-10-C files are read by
severity, the table lists every cell, and the job is tracked in a real MLflow store (sqlite, artifacts
under the test's folder) as a child of the run that logged the model. Bad input is one line;
``rayrcm evaluate --help`` imports neither Ray nor torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import make_model, trained_digits_model

from rayrcm.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
CORRUPTIONS = "contrast,gaussian_noise"


def _cfg(model, out, name, workers=1, *extra):
    from rayrcm.orchestration import evaluate_job

    return evaluate_job.config_from_args([
        f"model={model}", f"out_dir={out}", f"name={name}", "tracking.enabled=false", "suite=clean,corruptions",
        f"corruptions={CORRUPTIONS}", "severities=1,5", "shard_size=90", "batch=64", f"workers={workers}",
        "flush_every=1", "progress_every_s=5", *extra])


def _plain_correct(model_file, corruption: str = "", severity: int = 0, seed: int = 0) -> tuple[int, int]:
    """(correct, images) of a plain PyTorch loop over the digits test split (the evaluation view)."""
    import torch

    from rayrcm.data.corruptions import corrupt_tensor
    from rayrcm.data.datasets import eval_images, eval_split
    from rayrcm.models.export import build_from_file
    from rayrcm.sections import DataConfig

    model, meta = build_from_file(model_file)
    ds, _, _ = eval_split(DataConfig(name="digits", image_size=int(meta["image_size"])), "test")
    x, y = eval_images(ds, list(range(len(ds))), int(meta["image_size"]))
    if corruption:
        x = corrupt_tensor(x, list(range(len(ds))), corruption, severity, seed=seed)
    model.eval()
    with torch.no_grad():
        pred = model(x.float() / 255).argmax(1)
    return int((pred == y).sum()), len(y)


def _write_cifar_c(root: Path, names: list[str], n: int = 360) -> Path:
    """A synthetic released CIFAR-10-C folder: ``<name>.npy`` (5 x n random images, a different block per
    severity) and ``labels.npy`` (the n labels five times)."""
    import numpy as np

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    np.save(root / "labels.npy", np.tile(rng.integers(0, 10, n), 5))
    for name in names:
        np.save(root / f"{name}.npy", rng.integers(0, 256, (5 * n, 32, 32, 3), dtype=np.uint8))
    return root


def _write_cifar10_1(root: Path, n: int = 150) -> Path:
    """A synthetic CIFAR-10.1 folder (v6 file names, ``n`` random images)."""
    import numpy as np

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    np.save(root / "cifar10.1_v6_data.npy", rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8))
    np.save(root / "cifar10.1_v6_labels.npy", rng.integers(0, 10, n))
    return root


def _plain_released(model_file, root: Path, corruption: str, severity: int, n: int, skip: int = 1) -> int:
    """Correct answers of a plain loop over every ``skip``-th of the first ``n`` images of a released file
    (``corruption`` "" = the CIFAR-10.1 folder ``root``)."""
    import torch

    from rayrcm.data.datasets import eval_images
    from rayrcm.data.shift import read_cifar10_1, read_cifar_c
    from rayrcm.models.export import build_from_file

    model, meta = build_from_file(model_file)
    ds = read_cifar_c(root, corruption, severity) if corruption else read_cifar10_1(root)
    x, y = eval_images(ds, list(range(0, n, skip)), int(meta["image_size"]))
    with torch.no_grad():
        return int((model.eval()(x.float() / 255).argmax(1) == y).sum())


# ----------------------------------------------------------------------------- without Ray


@pytest.mark.parametrize("argv, needle", [
    (["--suite", "clean,aa", "--set", "aa_queries=0"], "aa_queries=0 is invalid: must be >= 1"),
    (["--suite", "clean,bogus"], "suite='bogus' is invalid: choose from"),
    (["--severities", "0,3"], "severities='0,3' is invalid"),
    (["--corruptions", "frost"], "corruption='frost' is invalid: not generated here"),
    (["--c-path", "/no/such/folder"], "c_path='/no/such/folder' is invalid: no such folder"),
    (["--suite", "clean,shift"], "suite='shift' is invalid: needs --shift-path"),
])
def test_bad_input_is_one_line(tmp_path, capsys, argv, needle):
    from rayrcm.cli import main

    model = make_model(tmp_path / "model.pt")
    with pytest.raises(SystemExit) as exit_:
        main(["evaluate", "--model", str(model), "--out", str(tmp_path), "--set", "tracking.enabled=false", *argv])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1 and needle in err, err


def test_a_missing_released_corruption_file_is_one_line_naming_it(tmp_path):
    from rayrcm.orchestration import evaluate_job

    root = _write_cifar_c(tmp_path / "CIFAR-10-C", ["contrast"], n=20)
    model = make_model(tmp_path / "model.pt")
    cfg = evaluate_job.config_from_args([f"model={model}", f"out_dir={tmp_path}", "tracking.enabled=false",
                                         "suite=corruptions", f"c_path={root}", "corruptions=contrast,fog",
                                         "max_images=10"])
    with pytest.raises(ConfigError, match=r"fog\.npy.*missing: no fog\.npy in that folder \(found: contrast\)"):
        evaluate_job.prepare(cfg)
    big = evaluate_job.config_from_args([f"model={model}", f"out_dir={tmp_path}", "tracking.enabled=false",
                                         "suite=corruptions", f"c_path={root}", "max_images=30"])
    with pytest.raises(ConfigError, match="20 images per severity; the job's images go up to index 29"):
        evaluate_job.prepare(big)


def test_evaluate_help_has_an_example_and_imports_neither_ray_nor_torch(capsys):
    from rayrcm.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["evaluate", "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and "rayrcm evaluate" in out.split("example:", 1)[1] and "generated" in out
    probe = ("import sys; from rayrcm.cli import main\n"
             "try:\n    main(['evaluate', '--help'])\nexcept SystemExit:\n    pass\n"
             "print(sorted(m for m in ('ray', 'torch', 'mlflow') if m in sys.modules), file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.stderr.strip().splitlines()[-1] == "[]", done.stderr


def test_tables_of_a_hand_made_result():
    import pandas as pd

    from rayrcm.orchestration import evaluate_job as ej

    rows = pd.DataFrame([
        {"model": "m", "set": "digits", "corruption": "none", "severity": 0, "generated": False, "attack": "none",
         "images": 10, "correct": 9},
        {"model": "m", "set": "digits", "corruption": "none", "severity": 0, "generated": False, "attack": "aa-apgd",
         "images": 10, "correct": 2},
        *[{"model": "m", "set": "digits-c-generated", "corruption": c, "severity": s, "generated": True,
           "attack": "none", "images": 5, "correct": k} for c in ("contrast", "fog") for s in (1, 5)
          for k in (4 if s == 1 else 1, 1 if s == 1 else 0)],  # two shards per cell
    ])
    table = ej.results_table(rows)
    assert list(table.columns) == ej.RESULT_COLUMNS and len(table) == 6
    assert table.iloc[0].accuracy == pytest.approx(0.9) and table["images"].tolist() == [10, 10, 10, 10, 10, 10]
    head = ej.headline(table)
    assert head == pytest.approx({"SA": 0.9, "APGD-CE+APGD-T (upper bound)": 0.2, "CS-1 (generated)": 0.5,
                                  "CS-5 (generated)": 0.1})
    md, tex = ej.to_markdown(table), ej.to_latex(table)
    assert "| digits-c-generated | fog | 5 | generated | none | 10 | 0.100 |" in md
    assert r"CS-1 (generated) & CS-5 (generated)" in tex and r"digits-c-generated & contrast & 1 & yes" in tex


# ----------------------------------------------------------------------------- the fine-tuning chain's numbers


def test_the_chain_robustness_table_equals_the_evaluate_job_for_the_same_model(tmp_path):
    """The fine-tuning chain's evaluation (``RobustAccuracy``, on 1 and on 2 workers) and the evaluate
    job's shards (the actor's own code: 3 shards of 16 images, 2 batches each) seed their attacks by
    image index: the same SA, PGD, APGD-CE+APGD-T and standard AutoAttack counts, one table."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is faster than two waiting on each other
    try:
        _chain_equals_job(tmp_path)
    finally:
        torch.set_num_threads(threads)


def _chain_equals_job(tmp_path):
    import pandas as pd
    from torch.utils.data import TensorDataset

    from rayrcm.analysis.robustness import results_table, robust_cells
    from rayrcm.eval.robust import RobustAccuracy, RobustEvalConfig
    from rayrcm.eval.suites.shards import shard_correct, shard_images
    from rayrcm.models.export import build_from_file
    from rayrcm.orchestration import evaluate_job as ej

    model_file = trained_digits_model(tmp_path / "model.pt")
    budget = {"eps": 0.03, "step_size": 0.01, "pgd_steps": 3, "aa_iters": 5, "aa_targets": 3, "aa_queries": 30}
    cfg = ej.config_from_args([f"model={model_file}", f"out_dir={tmp_path}", "name=job", "tracking.enabled=false",
                               "suite=clean,pgd,aa-apgd,aa", "max_images=48", "shard_size=16", "batch=8", "seed=3",
                               *[f"{k}={v}" for k, v in budget.items()]])
    p = ej.prepare(cfg)
    model, _ = build_from_file(model_file)
    model.eval()
    rows = []
    for r in p.todo:  # what each actor does with its shard rows
        x, y = shard_images(r, p.images, p.labels, p.settings)
        rows.append({**r, "images": len(y), "correct": shard_correct(model, x, y, r["attack"], p.settings,
                                                                      index=r["index"])})
    job = results_table(pd.DataFrame(rows), "m")
    chain = RobustAccuracy(RobustEvalConfig(batch_size=8, **budget))
    data = TensorDataset(p.images.float() / 255, p.labels)  # the same 48 test images, [0, 1]
    one = chain.counts(model, data, seed=3)
    two = sum(chain.counts(model, data, rank=r, world=2, seed=3) for r in range(2))
    assert one.tolist() == two.tolist()
    table = robust_cells(one.tolist(), pgd_steps=3, model="m", set_="digits")
    assert table.equals(job), (table, job)
    sa, pgd, apgd, aa = (int(job.set_index("attack").loc[a, "correct"]) for a in ("none", "pgd3", "aa-apgd", "aa"))
    assert 48 > sa > pgd >= apgd >= aa > 0  # the budget leaves something to find
    metrics = chain.metrics(one, "slf")
    assert metrics["slf_sa"] == pytest.approx(sa / 48) and metrics["slf_aa"] == pytest.approx(aa / 48)


# ----------------------------------------------------------------------------- on Ray


SUITE = ("suite=clean,corruptions,pgd,aa-apgd", "pgd_steps=3", "aa_iters=3", "aa_targets=2")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, ray_cluster):
    """The same job on 1 and on 2 actors (clean, 2 corruptions x 2 severities, PGD-3, APGD-3)."""
    from rayrcm.orchestration import evaluate_job

    tmp = tmp_path_factory.mktemp("evaluate")
    model_file = make_model(tmp / "model.pt", seed=1)
    one = evaluate_job.run(_cfg(model_file, tmp / "out", "one", 1, *SUITE), show_table=False)
    two = evaluate_job.run(_cfg(model_file, tmp / "out", "two", 2, *SUITE), show_table=False)
    return tmp, model_file, one, two


@pytest.mark.slow
def test_clean_accuracy_and_generated_corruptions_equal_a_plain_loop(setup):
    _, model_file, result, _ = setup
    t = result.table.set_index(["set", "corruption", "severity", "attack"])
    correct, images = _plain_correct(model_file)
    clean = t.loc[("digits", "none", 0, "none")]
    assert (int(clean.correct), int(clean.images)) == (correct, images) == (correct, 360)
    assert clean.accuracy == pytest.approx(correct / images) and not clean.generated
    for corruption in CORRUPTIONS.split(","):
        for severity in (1, 5):
            cell = t.loc[("digits-c-generated", corruption, severity, "none")]
            assert bool(cell.generated) and int(cell.images) == 360
            assert int(cell.correct) == _plain_correct(model_file, corruption, severity)[0], (corruption, severity)
    assert len(result.rows) == 7 * 4 and result.computed == 28  # 7 cells x 4 shards of <= 90 images
    assert set(result.table["attack"]) == {"none", "pgd3", "aa-apgd"}


@pytest.mark.slow
def test_one_and_two_actors_give_identical_rows_attacks_included(setup):
    _, _, one, two = setup
    cols = ["key", "set", "corruption", "severity", "generated", "attack", "shard", "images", "correct"]
    a = one.rows[cols].sort_values("key").reset_index(drop=True)
    b = two.rows[cols].sort_values("key").reset_index(drop=True)
    assert len(a) == 28 and a.equals(b)
    assert one.table.equals(two.table)
    assert set(two.rows["device"]) == {"cpu"}


@pytest.mark.slow
def test_per_class_accuracies_are_a_plain_loops_and_add_up_to_every_cell(setup):
    import pandas as pd
    import torch

    from rayrcm.data.datasets import eval_images, eval_split
    from rayrcm.models.export import build_from_file
    from rayrcm.sections import DataConfig

    _, model_file, one, two = setup
    model, meta = build_from_file(model_file)
    ds, _, _ = eval_split(DataConfig(name="digits", image_size=int(meta["image_size"])), "test")
    x, y = eval_images(ds, list(range(len(ds))), int(meta["image_size"]))
    with torch.no_grad():
        hit = model.eval()(x.float() / 255).argmax(1) == y
    classes = pd.read_csv(one.out / "per_class.csv")
    clean = classes[(classes["set"] == "digits") & (classes["attack"] == "none")].set_index("class")
    for c in range(10):  # the clean cell, class by class, as a plain loop counts it
        assert (clean.loc[c, "images"], clean.loc[c, "correct"]) == (int((y == c).sum()), int(hit[y == c].sum()))
    sums = classes.groupby(["set", "corruption", "severity", "attack"])[["images", "correct"]].sum()
    cells = one.table.set_index(["set", "corruption", "severity", "attack"])[["images", "correct"]]
    assert sums.sort_index().equals(cells.sort_index())  # every cell's classes add up to the cell
    worst = clean["accuracy"].min()
    assert one.metrics["worst_class_sa"] == pytest.approx(worst) and worst < one.metrics["sa"]
    assert one.metrics["worst_class_sa"] == two.metrics["worst_class_sa"]  # the same on two actors
    assert one.metrics["worst_class_pgd3"] <= one.metrics["pgd3"]
    md = (one.out / "per_class.md").read_text()
    assert f"| digits | none | 0 | none | 360 | {one.metrics['sa']:.3f} | 10 | {int(clean['accuracy'].idxmin())} | " in md


@pytest.mark.slow
def test_a_partial_run_resumes_computing_only_the_missing_shards(setup):
    import shutil

    from rayrcm.orchestration import evaluate_job

    tmp, model_file, _, full = setup
    shutil.copytree(full.out, tmp / "out" / "resume")  # a run of the same protocol that lost two parts
    parts = sorted((tmp / "out" / "resume" / "rows").glob("part-*.parquet"))
    assert len(parts) == 28  # flush_every=1: one part per shard
    parts[3].unlink()
    parts[11].unlink()
    cfg = _cfg(model_file, tmp / "out", "resume", 2, *SUITE, "severities=1,3,5")  # and severity 3 is new
    again = evaluate_job.run(cfg, show_table=False)
    assert again.computed == 2 + 2 * 4 and len(again.table) == 3 + 2 * 3
    assert not again.rows["key"].duplicated().any()
    old = again.table[again.table["severity"] != 3].reset_index(drop=True)
    assert old.equals(full.table)
    assert evaluate_job.run(cfg, show_table=False).computed == 0
    with pytest.raises(ConfigError, match="another protocol"):
        evaluate_job.prepare(_cfg(model_file, tmp / "out", "resume", 2, *SUITE, "seed=1"))


@pytest.mark.slow
def test_released_cifar_c_and_cifar10_1_files_are_read_and_not_labelled_generated(setup):
    from rayrcm.orchestration import evaluate_job

    tmp, model_file, _, _ = setup
    root = _write_cifar_c(tmp / "CIFAR-10-C", ["contrast"])
    shift = _write_cifar10_1(tmp / "CIFAR-10.1", n=150)
    result = evaluate_job.run(_cfg(model_file, tmp / "out", "released", 2, "suite=corruptions,shift",
                                   f"c_path={root}", f"shift_path={shift}", "corruptions=contrast", "max_images=120",
                                   "skip=2"), show_table=False)
    t = result.table
    assert t["set"].tolist() == ["cifar10.1", "cifar10-c", "cifar10-c"] and not t["generated"].any()
    assert t["severity"].tolist() == [0, 1, 5]
    assert (t.iloc[0].images, t.iloc[0].correct) == (75, _plain_released(model_file, shift, "", 0, 150, 2))
    for r in t.iloc[1:].itertuples():
        assert (r.images, r.correct) == (120, _plain_released(model_file, root, "contrast", r.severity, 240, 2))
    md = (result.out / "table.md").read_text()
    assert "| cifar10-c | contrast | 5 | no | none | 120 |" in md and "| cifar10.1 | none | 0 | no | none | 75 |" in md
    assert "(generated)" not in md


@pytest.mark.slow
def test_the_table_and_plot_list_every_corruption_and_severity(setup):
    import pandas as pd

    from rayrcm.orchestration import evaluate_job

    tmp, model_file, one, _ = setup
    result = evaluate_job.run(_cfg(model_file, tmp / "out", "one", 1, *SUITE), show_table=False)  # nothing to do
    assert result.computed == 0 and result.table.equals(one.table)
    md = (result.out / "table.md").read_text()
    for corruption in CORRUPTIONS.split(","):
        for severity in (1, 5):
            assert f"| digits-c-generated | {corruption} | {severity} | generated | none | 360 |" in md
    assert "CS-1 (generated)" in md and "CS-5 (generated)" in md
    assert "\\begin{tabular}" in (result.out / "table.tex").read_text()
    assert (result.out / "accuracy_vs_severity.png").stat().st_size > 1000
    saved = pd.read_parquet(result.out / "results.parquet")
    assert list(saved.columns) == evaluate_job.RESULT_COLUMNS and len(saved) == 7
    assert "PGD-3" in md and "APGD-CE+APGD-T (upper bound)" in md


@pytest.mark.slow
def test_evaluation_is_tracked_under_the_model_run(setup):
    from mlflow.tracking import MlflowClient

    from rayrcm.orchestration import evaluate_job, tracking

    tmp, model_file, _, _ = setup
    uri = f"sqlite:///{tmp / 'mlflow.db'}"  # a real MLflow store; artifacts under tmp, not the working dir
    MlflowClient(uri).create_experiment("eval-e2e", artifact_location=(tmp / "artifacts").as_uri())
    train_run = tracking.start_job_run(uri, "eval-e2e", "train-job", {"method.sigma": 0.25})
    tracking.log_artifacts(uri, train_run, [model_file], "model")  # runs:/<id>/model holds model.pt
    tracking.end_run(uri, train_run, ok=True)
    cfg = _cfg(f"runs:/{train_run}/model", tmp / "out", "tracked", 2, f"tracking.uri={uri}",
               "tracking.enabled=true", "corruptions=contrast", "max_images=90")
    result = evaluate_job.run(cfg, show_table=False)
    client = MlflowClient(uri)
    run = client.get_run(result.run_id)
    assert run.data.tags["mlflow.parentRunId"] == train_run and run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "eval-e2e"
    assert run.data.tags["rayrcm.corruptions"] == "generated"
    assert run.data.metrics["sa"] == pytest.approx(result.metrics["sa"])
    assert run.data.metrics["cs5_generated"] == pytest.approx(result.metrics["cs5_generated"])
    names = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"protocol.json", "results.parquet", "results.csv", "table.md", "table.tex", "accuracy_vs_severity.png",
            "rows"} <= names
    assert evaluate_job.run(cfg, show_table=False).computed == 0


@pytest.mark.slow
def test_compare_puts_the_jobs_side_by_side_with_their_cells(setup, capsys):
    """``rayrcm compare`` on two real job folders of one model: one row (the model's, named after its
    file's folder), every headline cell the job's own table's value in percent."""
    from rayrcm.analysis.robustness import headline
    from rayrcm.cli import main

    tmp, model_file, one, two = setup
    with pytest.raises(SystemExit) as exit_:
        main(["compare", str(one.out), str(two.out), "--out", str(tmp / "compare.md")])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("| ")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    assert head[:4] == ["model", "SA", "PGD-3", "APGD-CE+APGD-T (upper bound)"] and "CS-5 (generated)" in head
    assert len(lines) == 2 and "note:" not in out  # the same model, the same cells: one row
    cells = dict(zip(head, (c.strip() for c in lines[1].strip("|").split("|"))))
    assert cells["model"] == model_file.parent.name
    assert {k: cells[k] for k in head[1:]} == {k: f"{100 * v:.1f}" for k, v in headline(one.table).items()}
    assert "Attacks: eps=8/255, norm=L-inf, pgd_steps=3" in out
    assert (tmp / "compare.md").read_text().count(f"| {model_file.parent.name} |") == 1
