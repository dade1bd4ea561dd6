"""A recipe's whole table in one command (``python experiments/rcm_digits.py all``): the stage graph
checked before Ray, overrides routed to the stages that have the key, fingerprints that change
exactly downstream of a changed stage, and on a real Ray cluster and MLflow server: the table, a
rerun that reuses every finished stage (same run ids), and a changed fine-tuning key that reruns
only that fine-tuning and its certification."""

from __future__ import annotations

import sys
from pathlib import Path
from unittest import mock

import pytest
from helpers import load_experiment

from rayrcm.errors import ConfigError
from rayrcm.pipeline import Stage, order, plan

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))

# CI size: 4 steps at 8 px, 9 images at n = 100
TINY = ["train.epochs=0", "train.steps=4", "data.image_size=8", "optim.warmup_epochs=0", "optim.schedule_epochs=0",
        "train.checkpoint_epochs=0", "train.checkpoint_every=2", "smoothing.n=100", "smoothing.n0=20", "smoothing.skip=40"]


def _stages(sigmas=(0.25, 0.5)):
    import rcm_digits
    from _rcm_seed import table_stages

    return table_stages(rcm_digits.pretrain_config, rcm_digits.finetune_config, rcm_digits.certify_config, sigmas)


def _plan(overrides, sigmas=(0.25, 0.5)):
    from rayrcm.orchestration.pipeline_job import _apply, _name

    return {p.stage.name: p for p in plan(_stages(sigmas), [*TINY, *overrides], _apply, _name("rcm-digits"))}


@pytest.mark.parametrize("stages, needle", [
    ([Stage("a", "train", dict), Stage("b", "train", dict, inputs={"model.init_from": "c"})], "names no stage"),
    ([Stage("a", "train", dict, after=("b",)), Stage("b", "train", dict, after=("a",))], "form a cycle"),
    ([Stage("a", "train", dict), Stage("a", "certify", dict)], "is declared twice"),
    ([Stage("a", "probe-ish", dict)], "must be one of train, certify"),
])
def test_a_bad_graph_is_one_line(stages, needle):
    with pytest.raises(ConfigError) as err:
        order(stages)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_overrides_reach_the_stages_with_the_key_and_fingerprints_change_downstream_only(tmp_path):
    base = _plan([f"train.storage_path={tmp_path}"])
    assert set(base) == {"pretrain", "finetune-0.25", "certify-0.25", "finetune-0.5", "certify-0.5"}
    names = list(base)
    assert names.index("pretrain") < names.index("finetune-0.5") < names.index("certify-0.5")  # inputs first
    assert base["finetune-0.25"].config.train.steps == 4 and base["certify-0.5"].config.smoothing.n == 100
    assert base["finetune-0.25"].config.model.init_from == "<pretrain>" and base["certify-0.5"].config.model == "<finetune-0.5>"
    assert base["finetune-0.25"].config.train.name.endswith(base["finetune-0.25"].fingerprint[:8])
    changed = _plan([f"train.storage_path={tmp_path}", "finetune-0.5:method.lbd=5"])
    assert changed["finetune-0.5"].config.method.lbd == 5 and changed["finetune-0.25"].config.method.lbd == 10
    moved = {n for n in base if base[n].fingerprint != changed[n].fingerprint}
    assert moved == {"finetune-0.5", "certify-0.5"}
    upstream = _plan([f"train.storage_path={tmp_path}", "pretrain:optim.lr=2e-3"])
    assert {n for n in base if base[n].fingerprint != upstream[n].fingerprint} == set(base)  # everything after it
    assert _plan([f"train.storage_path={tmp_path}"])["certify-0.25"].fingerprint == base["certify-0.25"].fingerprint


@pytest.mark.parametrize("argv, needle", [
    (["--set", "optim.lrr=1"], "matches no stage's key (stages: pretrain, finetune-0.25, certify-0.25, "),
    (["--set", "optim.lrr=1"], "(did you mean optim.lr?)"),
    (["--set", "finetune-0.3:optim.lr=1"], "names no stage"),
    (["--set", "finetune-0.25:smoothing.n=5"], "stage finetune-0.25 has no key smoothing.n"),
    (["--sigmas", "0.3"], "--sigmas='0.3' is invalid: each must be one of 0.25, 0.5, 1"),
    (["--set", "optim.lr=-1"], "optim.lr=-1.0 is invalid: must be > 0"),
])
def test_bad_input_to_all_is_one_line_before_ray(capsys, argv, needle):
    import rcm_digits

    def no_ray(**_kw):
        raise AssertionError("bad input reached Ray")

    with mock.patch("rayrcm.orchestration.cluster.ensure_ray", side_effect=no_ray), pytest.raises(SystemExit) as exit_:
        rcm_digits.main(["all", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and needle in err[0], err


def _all(capsys, sets, *extra):
    """``rcm_digits.py all`` in this process (the module's Ray cluster): the printed lines and result."""
    from rayrcm.orchestration.pipeline_job import run_all

    result = run_all("rcm-digits", _stages(), [*sets, *extra])
    return capsys.readouterr().out, result


def _kill_midway(sets, tmp_path):
    """Start ``all`` as its own driver on this cluster and SIGKILL it once the pretraining finished and
    the sigma-0.25 fine-tuning wrote a checkpoint; returns that job's folder."""
    import os
    import signal
    import subprocess
    import time

    import ray

    cmd = [sys.executable, str(REPO / "experiments" / "rcm_digits.py"), "all", "--sigmas", "0.25,0.5",
           *[x for s in sets for x in ("--set", s)]]
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    driver = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, job = time.time() + 300, None
    while time.time() < deadline and driver.poll() is None and job is None:
        if (tmp_path / "train" / "pipelines" / "rcm-digits" / "pretrain.json").is_file():
            job = next((d for d in (tmp_path / "train").glob("rcm-digits-finetune-sigma-0_25-*")
                        if list(d.glob("checkpoint_*"))), None)
        time.sleep(0.25)
    assert job is not None and driver.poll() is None, "the fine-tuning never reached a checkpoint while the driver ran"
    driver.send_signal(signal.SIGKILL)
    driver.wait(30)
    time.sleep(5)  # Ray reaps the dead driver's tasks and their Ray Train controllers
    return job


@pytest.mark.slow  # a real Ray cluster and MLflow server; about three minutes on 2 CPUs
def test_all_resumes_when_killed_reuses_what_finished_and_reruns_what_changed(ray_cluster, mlflow_server, tmp_path,
                                                                             capsys):
    """Killed midway, the same command reuses the pretraining (same run) and resumes the fine-tuning from
    its checkpoint; then the table, equal to an uninterrupted run's; run again, every stage is reused;
    with one fine-tuning key changed, only that fine-tuning and its certification run."""
    import json

    from mlflow import MlflowClient

    from rayrcm.analysis import read_results
    from rayrcm.analysis.certified import certified_accuracy
    from rayrcm.orchestration.pipeline_job import FINGERPRINT_TAG, PIPELINE_TAG

    sets = [*TINY, "finetune-0.25:train.steps=12", "finetune-0.25:train.checkpoint_every=3",
            f"train.storage_path={tmp_path / 'train'}", f"out_dir={tmp_path / 'certify'}", f"tracking.uri={mlflow_server}",
            "tracking.experiment=pipeline"]
    killed = _kill_midway(sets, tmp_path)
    records = tmp_path / "train" / "pipelines" / "rcm-digits"
    assert not (records / "finetune-0.25.json").exists()
    pretrain_run = json.loads((records / "pretrain.json").read_text())["run_id"]

    out, first = _all(capsys, sets)
    assert first.outputs["pretrain"].reused and first.outputs["pretrain"].run_id == pretrain_run
    resumed = first.outputs["finetune-0.25"]
    assert not resumed.reused and resumed.job == killed.name and f"{killed.name}: resuming at step " in out
    table = first.table.table
    assert list(table.index) == ["sigma=0.25", "sigma=0.5"] and list(table["sigma"]) == ["0.25", "0.5"]
    for row, stage in (("sigma=0.25", "certify-0.25"), ("sigma=0.5", "certify-0.5")):
        rows = read_results(first.outputs[stage].out)
        assert len(rows) == 9 and table.loc[row, "r=0.00"] == pytest.approx(certified_accuracy(rows, [0.0])[0])
    assert "| sigma=0.25 | 0.25 |" in out and (first.folder / "table.tex").is_file()
    client = MlflowClient(mlflow_server)
    parent = client.get_run(first.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(first.parent_run_id)} >= {"table.md", "table.tex", "certified_accuracy.png"}
    for o in first.outputs.values():
        run = client.get_run(o.run_id)
        assert run.data.tags[FINGERPRINT_TAG] == o.fingerprint and o.run_id in parent.data.tags["mlflow.note.content"]
        assert o.reused or run.data.tags[PIPELINE_TAG] == first.parent_run_id
        assert o.stage.startswith("certify") or run.data.tags["mlflow.parentRunId"] == first.parent_run_id  # nested
    hist = client.get_metric_history(resumed.run_id, "loss")  # the resumed run logged each step once
    assert len(hist) == len({m.step for m in hist})

    fresh_sets = [x.replace(str(tmp_path / "train"), str(tmp_path / "fresh-train"))
                  .replace(str(tmp_path / "certify"), str(tmp_path / "fresh-certify")) for x in sets]
    _, fresh = _all(capsys, fresh_sets)  # the same table, uninterrupted, from nothing
    assert not any(o.reused for o in fresh.outputs.values())
    assert fresh.table.table.equals(table), (fresh.table.table, table)

    out, again = _all(capsys, sets)  # nothing changed: every stage reused, no new run
    assert all(o.reused for o in again.outputs.values()) and out.count(": reused (") == 5
    assert {n: o.run_id for n, o in again.outputs.items()} == {n: o.run_id for n, o in first.outputs.items()}
    assert again.parent_run_id == first.parent_run_id and again.table.table.equals(table)

    out, changed = _all(capsys, sets, "finetune-0.5:method.lbd=5")
    rerun = {n for n, o in changed.outputs.items() if not o.reused}
    assert rerun == {"finetune-0.5", "certify-0.5"}
    for n in ("pretrain", "finetune-0.25", "certify-0.25"):
        assert changed.outputs[n].run_id == first.outputs[n].run_id
    for n in rerun:
        assert changed.outputs[n].run_id != first.outputs[n].run_id
    assert client.get_run(changed.outputs["finetune-0.5"].run_id).data.params["method.lbd"] == "5.0"
    assert changed.parent_run_id != first.parent_run_id
    assert changed.table.table.loc["sigma=0.25"].equals(table.loc["sigma=0.25"])


def test_a_stage_that_fails_in_its_task_is_one_line():
    """Ray wraps a task's exception in a RayTaskError whose text is a traceback; the stage's own
    one-line error comes back out, and anything else is one RunFailed line naming the stage."""
    from ray.exceptions import RayTaskError

    from rayrcm.errors import NonFiniteLoss, RunFailed
    from rayrcm.orchestration.pipeline_job import stage_failure

    diverged = NonFiniteLoss(3, float("nan"))
    assert stage_failure(RayTaskError("stage", "Traceback ...", diverged), "rcm-digits", "finetune-0.5") is diverged
    bad = ConfigError("model", "x", "is not a model")
    assert stage_failure(RayTaskError("stage", "tb", bad).as_instanceof_cause(), "r", "s") is bad
    other = stage_failure(RayTaskError("stage", "tb", MemoryError("out of memory\nin worker 2")), "rcm-digits", "certify-1")
    assert isinstance(other, RunFailed) and "\n" not in str(other)
    assert str(other).startswith("rcm-digits all: stage certify-1 failed: in worker 2; rerun the same command")


@pytest.mark.parametrize("recipe, argv, stages", [
    ("rcm_digits", [], ["pretrain", "finetune-0.25", "certify-0.25", "finetune-0.5", "certify-0.5", "finetune-1", "certify-1"]),
    ("acl_digits", ["--method", "acl"], ["pretrain", "finetune-slf", "finetune-alf", "finetune-aff"]),
    ("cadis_digits", ["--sigma", "0.25"], ["base", "denoiser", "finetune", "certify-dds", "certify-cadis"]),
    ("moco_digits", [], ["pretrain-plain", "pretrain-patch", "probe-plain", "probe-patch"]),
    ("stablerep_digits", [], ["pretrain-image", "pretrain-label", "probe-image", "probe-label"]),
])
def test_every_digits_recipe_declares_its_table(tmp_path, recipe, argv, stages):
    """``all --dry-run`` of each digits recipe, as a user runs it: its stages, each to run, inputs first."""
    import subprocess

    out = subprocess.run([sys.executable, str(REPO / "experiments" / f"{recipe}.py"), "all", "--dry-run", *argv],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith(f"[rayrcm] {recipe.replace('_', '-')} all: {len(stages)} stages")
    listed = [line.split()[0] for line in lines[1:]]
    assert sorted(listed) == sorted(stages) and all(" run " in line for line in lines[1:])
    for line in lines[1:]:
        for need in (line.split(" <- ")[1].split(", ") if " <- " in line else []):
            assert listed.index(need) < listed.index(line.split()[0])


def test_stages_of_one_row_fill_one_row_of_the_table():
    """MoCo's table: the pretraining's k-NN accuracy and its probe's accuracy are one row per method."""
    from rayrcm.analysis.paper import paper_table
    from rayrcm.orchestration.pipeline_job import StageOutput, _rows
    from rayrcm.pipeline import Planned

    moco = load_experiment("moco_digits")
    planned = [Planned(st, None, st.name, ()) for st in moco.table_stages()]
    done = {p.stage.name: StageOutput(p.stage.name, "f", "j", None, "r",
                                      metrics={"test_knn_acc": 0.5 + i / 100, "test_acc_clean": 0.8 + i / 100})
            for i, p in enumerate(planned)}
    table = paper_table(_rows(planned, done)).table
    assert list(table.index) == ["MoCo v2", "MoCo v2 + patch negatives"]
    assert table.loc["MoCo v2", "k-NN"] == done["pretrain-plain"].metrics["test_knn_acc"]
    assert table.loc["MoCo v2", "linear probe"] == done["probe-plain"].metrics["test_acc_clean"]
    assert table.loc["MoCo v2 + patch negatives", "k-NN"] == done["pretrain-patch"].metrics["test_knn_acc"]
