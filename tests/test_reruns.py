"""Reruns and failures of jobs on a real local Ray cluster with a real MLflow store.

* a rerun of a training job under its name with another config is refused at once, in one line
  naming the differing keys, without touching the job's files or its MLflow run;
* a rerun that fails before doing any work leaves a FINISHED run FINISHED; a certification that
  fails after its run was opened ends the run FAILED;
* a GPU request the cluster cannot satisfy fails with one line instead of waiting forever.
"""

from __future__ import annotations

import re
import time

import pytest
import yaml
from helpers import make_model

from rayrcm.cli import main
from rayrcm.config import ExperimentConfig, apply_overrides
from rayrcm.errors import ConfigError
from rayrcm.orchestration import certify_job, results_job, tracking
from rayrcm.orchestration.trainer import JOB_CONFIG_FILE, fit

pytestmark = pytest.mark.slow

BASE = {"method": {"name": "gaussian", "sigma": 0.25}, "data": {"image_size": 8, "batch_size": 16},
        "model": {"patch_size": 4}, "train": {"steps": 4, "workers": 1, "checkpoint_every": 2, "log_every": 2,
                                              "eval_sigmas": [0.25]}}


def _overrides(tmp, uri, name, *extra):
    return [f"train.storage_path={tmp / 'storage'}", f"train.name={name}", f"tracking.uri={uri}",
            "tracking.experiment=reruns", *extra]


def _cfg(tmp, uri, name, *extra):
    flat = [f"{section}.{k}={','.join(map(str, v)) if isinstance(v, list) else v}"
            for section, keys in BASE.items() for k, v in keys.items()]
    return apply_overrides(ExperimentConfig(), flat + _overrides(tmp, uri, name, *extra))


def _files(folder):
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _run_state(uri, run_id):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    run = client.get_run(run_id)
    return (run.info.status, run.info.end_time, dict(run.data.params), dict(run.data.tags),
            [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")])


@pytest.fixture(scope="module")
def finished(tmp_path_factory, ray_cluster):
    tmp = tmp_path_factory.mktemp("reruns")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    result = fit(_cfg(tmp, uri, "tiny", "tracking.register_as=reruns-model"))
    assert tracking.run_status(uri, result.run_id) == "FINISHED"
    assert (tmp / "storage" / "tiny" / JOB_CONFIG_FILE).is_file()
    return tmp, uri, result


def test_a_rerun_with_another_config_is_refused_without_touching_the_job(finished, capsys):
    tmp, uri, result = finished
    recipe = tmp / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(BASE))
    job = tmp / "storage" / "tiny"
    files, state = _files(job), _run_state(uri, result.run_id)
    capsys.readouterr()
    tic = time.perf_counter()
    with pytest.raises(SystemExit) as exit_:
        main(["train", str(recipe), *[f"--set={o}" for o in _overrides(tmp, uri, "tiny", "train.steps=2",
                                                                          "tracking.register_as=other-name")]])
    seconds = time.perf_counter() - tic
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and seconds < 5, seconds
    assert len(err.splitlines()) == 1 and err.startswith("rayrcm: error: train.name='tiny'"), err
    assert "train.steps (4 -> 2)" in err and "tracking.register_as ('reruns-model' -> 'other-name')" in err, err
    assert "--set train.name=<new name>" in err, err

    with pytest.raises(ConfigError, match=r"model\.init_from \(None -> '.*model\.pt'\)|model\.init_from \('' -> "):
        fit(_cfg(tmp, uri, "tiny", "tracking.register_as=reruns-model", f"model.init_from={result.model_file}"))
    assert _files(job) == files, "the job's files are untouched"
    assert _run_state(uri, result.run_id) == state, "the job's MLflow run is unchanged"


def test_keys_that_may_change_on_resume_are_accepted(finished):
    from rayrcm.orchestration.trainer import check_rerun, job_config, prepare

    tmp, uri, _ = finished
    cfg, _ = prepare(_cfg(tmp, uri, "tiny", "tracking.register_as=reruns-model", "train.max_failures=3",
                          "train.progress_every_s=1", "data.num_workers=0", "train.keep_checkpoints=1"), job=True)
    assert check_rerun(cfg.train.storage_path, "tiny", job_config(cfg))


def test_a_rerun_that_fails_before_any_work_leaves_the_finished_run_as_it_was(finished, monkeypatch):
    tmp, uri, result = finished
    state = _run_state(uri, result.run_id)

    def broken(*args, **kwargs):
        raise RuntimeError("the cluster went away")

    monkeypatch.setattr("ray.train.torch.TorchTrainer", broken)
    with pytest.raises(RuntimeError, match="went away"):
        fit(_cfg(tmp, uri, "tiny", "tracking.register_as=reruns-model"))
    assert _run_state(uri, result.run_id) == state


def test_a_failed_certification_ends_its_run_failed(tmp_path, ray_cluster, monkeypatch):
    """Writing results fails (a read-only folder) after the run was opened: the run ends FAILED."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    model = make_model(tmp_path / "model.pt")
    cfg = certify_job.config_from_args([
        f"model={model}", f"out_dir={tmp_path / 'out'}", "name=ro", f"tracking.uri={uri}", "tracking.experiment=c",
        "smoothing.n0=100", "smoothing.n=100", "smoothing.chunk=100", "smoothing.indices=0,1", "compute.batch=100",
        "compute.flush_every=1"])

    def read_only(folder, records):
        if records:
            raise PermissionError(f"[Errno 30] Read-only file system: '{folder}'")

    monkeypatch.setattr(results_job, "write_part", read_only)  # the skeleton writes every results job's parts
    with pytest.raises(PermissionError):
        certify_job.run(cfg)
    run_id = tracking.find_job_run(uri, "c", "ro")
    assert run_id and tracking.run_status(uri, run_id) == "FAILED"


@pytest.mark.timeout(120)
def test_a_gpu_request_on_a_cluster_without_gpus_fails_at_once(tmp_path, ray_cluster, capsys):
    import ray

    assert not ray.cluster_resources().get("GPU")
    model = make_model(tmp_path / "model.pt")
    tic = time.perf_counter()
    with pytest.raises(SystemExit) as exit_:
        main(["certify", "--model", str(model), "--gpu", "--out", str(tmp_path / "out"), "--n0", "100", "--n", "100",
              "--indices", "0", "--set", "tracking.enabled=false"])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and time.perf_counter() - tic < 30
    assert re.fullmatch(r"rayrcm: error: compute\.use_gpu=True is invalid: the Ray cluster has no GPUs "
                        r"\(cluster resources: \d+ CPU\)", err), err
    with pytest.raises(ConfigError, match=r"^train\.use_gpu=True is invalid: the Ray cluster has no GPUs"):
        fit(_cfg(tmp_path, "sqlite:///unused.db", "gpu", "train.use_gpu=true", "tracking.enabled=false"))
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("mlflow_run.json"))


def test_a_non_finite_loss_ends_the_job_with_one_line_and_nothing_registered(tmp_path, ray_cluster, capsys):
    """A loss that becomes non-finite stops training at that step: the user sees one line (exit 1),
    Ray Train's retry stops at once instead of replaying the same steps, no model is written or
    registered, and the MLflow run ends FAILED."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(BASE))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(["train", str(recipe), *[f"--set={o}" for o in _overrides(tmp_path, uri, "diverges", "optim.lr=1e30",
                                                                          "train.max_failures=2",
                                                                          "tracking.register_as=diverged")]])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("rayrcm: error:")]
    assert exit_.value.code == 1
    assert len(err) == 1 and re.match(r"rayrcm: error: loss is (nan|inf) at step \d+: training stopped", err[0]), err
    assert not (tmp_path / "storage" / "diverges" / "model.pt").exists()
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("reruns").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]
    assert not client.search_registered_models("name='diverged'")


def test_a_run_in_the_driver_process_ends_with_its_model(tmp_path, ray_cluster):
    """``train.workers=0`` (Ray Train's local mode keeps no checkpoint folder) still writes model.pt."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = fit(_cfg(tmp_path, uri, "in-driver", "train.workers=0", "tracking.register_as=in-driver-model"))
    assert result.model_file == tmp_path / "storage" / "in-driver" / "model.pt" and result.model_file.is_file()
    assert result.model["registry_uri"] == "models:/in-driver-model/1"
