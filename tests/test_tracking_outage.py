"""A tracking server that dies, and a worker killed right after it reported a checkpoint.

Real ``mlflow server`` processes on loopback ports, started, killed and restarted by the tests;
a real local Ray cluster. Nothing is mocked.

* the workers' metric logger never blocks training while the server is away, warns once, keeps
  the points and sends them (each (key, step) once) when the server is back;
* a server killed mid-run: the job trains to the end with its checkpoints and a warning, and the
  driver fails within a bounded time with one line naming the URI; rerun when the server is back,
  the job logs what was buffered and registers its model, with every step logged exactly once;
* a worker killed right after its step-4 report: the retry resumes from that checkpoint (not an
  older one, not step 0), no untracked checkpoint folder is left, no metric step is logged twice.
"""

from __future__ import annotations

import threading
import time

import pytest
from conftest import free_port, start_mlflow_server, stop_mlflow_server

from rayrcm.cli import main
from rayrcm.config import ExperimentConfig, apply_overrides
from rayrcm.errors import TrackingUnavailable
from rayrcm.orchestration import metric_buffer, tracking
from rayrcm.orchestration.train_worker import UNSENT_FILE
from rayrcm.orchestration.trainer import fit


def _history(uri, run_id, key):
    from mlflow.tracking import MlflowClient

    return [m.step for m in MlflowClient(uri).get_metric_history(run_id, key)]


@pytest.mark.slow
def test_the_buffered_logger_outlives_an_outage(tmp_path):
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_mlflow_server(tmp_path, port)
    run_id = tracking.start_job_run(uri, "outage", "job", {})
    said: list[str] = []
    logger = metric_buffer.BufferedMetricLogger(uri, run_id, say=said.append, retry_s=0.5)
    logger.log(1, {"loss": 1.0})
    assert logger.close(10) == [] and _history(uri, run_id, "loss") == [1]
    stop_mlflow_server(server)

    logger = metric_buffer.BufferedMetricLogger(uri, run_id, say=said.append, retry_s=0.5)
    tic = time.perf_counter()
    for step in range(1, 6):  # step 1 again: a step replayed after a resume
        logger.log(step, {"loss": float(step)})
    assert time.perf_counter() - tic < 0.1, "log() never waits for the server"
    time.sleep(1.0)
    assert any("unreachable" in line and uri in line for line in said), said
    tic = time.perf_counter()
    unsent = logger.close(2.0)
    assert time.perf_counter() - tic < 5.0, "close() waits a bounded time"
    assert [p[0] for p in unsent] == [1, 2, 3, 4, 5]

    server = start_mlflow_server(tmp_path, port)
    try:
        logger = metric_buffer.BufferedMetricLogger(uri, run_id, say=said.append, pending=unsent, retry_s=0.5)
        logger.log(6, {"loss": 6.0})
        assert logger.close(20) == []
        assert _history(uri, run_id, "loss") == [1, 2, 3, 4, 5, 6], "each (key, step) once"
    finally:
        stop_mlflow_server(server)


def _overrides(tmp, uri, name, *extra):
    return ["method.name=gaussian", "method.sigma=0.25", "data.image_size=8", "model.patch_size=4",
            "data.batch_size=32", "train.workers=1", "train.log_every=1", "train.eval_sigmas=0.25",
            f"train.storage_path={tmp / 'storage'}", f"train.name={name}", f"tracking.uri={uri}",
            "tracking.experiment=outage", *extra]


@pytest.mark.slow
def test_a_server_killed_mid_run_loses_no_checkpoint_and_no_metric(tmp_path, ray_cluster, capsys):
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_mlflow_server(tmp_path, port)
    job = tmp_path / "storage" / "mid-run"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("method: {name: gaussian, sigma: 0.25}\n")
    args = ["train", str(recipe), "--set", "tracking.flush_timeout_s=3", "--set", "tracking.register_as=outage-model",
            *[f"--set={o}" for o in _overrides(tmp_path, uri, "mid-run", "train.steps=30", "train.checkpoint_every=5")]]

    def kill_after_first_checkpoint():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not list(job.glob("checkpoint_*")):
            time.sleep(0.05)
        stop_mlflow_server(server, kill=True)

    killer = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    killer.start()
    tic = time.perf_counter()
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    took = time.perf_counter() - tic
    killer.join(5)
    out, err = capsys.readouterr()
    assert exit_info.value.code == 1 and took < 240
    assert "warning: MLflow server" in out and "training goes on" in out
    assert "step 30/30" in out, "training went on to the end"
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1].startswith(f"rayrcm: error: MLflow server {uri} is unreachable")
    assert "rerun the same command" in lines[-1] and str(job / "model.pt") in lines[-1]
    assert (job / "model.pt").is_file() and list(job.glob("checkpoint_*"))
    assert (job / UNSENT_FILE).is_file()

    server = start_mlflow_server(tmp_path, port)
    try:
        main(args)  # the same command: logs what was buffered and registers the model
    except SystemExit as done:
        assert done.code in (0, None)
    finally:
        out, _ = capsys.readouterr()
    try:
        assert "metric points kept from the job's last run" in out
        assert not (job / UNSENT_FILE).exists()
        run_id = tracking.find_job_run(uri, "outage", "mid-run")
        assert _history(uri, run_id, "loss") == list(range(1, 31)), "every step once"
        assert tracking.run_status(uri, run_id) == "FINISHED"
        from mlflow.tracking import MlflowClient

        versions = MlflowClient(uri).search_model_versions("name = 'outage-model'")
        assert [v.run_id for v in versions] == [run_id]
    finally:
        stop_mlflow_server(server)


@pytest.mark.slow
def test_a_checkpoint_reported_just_before_a_kill_is_resumed_from(tmp_path, ray_cluster, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    base = _overrides(tmp_path, uri, "reference", "train.steps=6", "train.checkpoint_every=2",
                      "train.keep_checkpoints=1")
    ref = fit(apply_overrides(ExperimentConfig(), base))
    killed = fit(apply_overrides(ExperimentConfig(), _overrides(
        tmp_path, uri, "killed", "train.steps=6", "train.checkpoint_every=2", "train.keep_checkpoints=1",
        "train.fault_at_step=4", "train.fault_mode=exit", "train.max_failures=1")))
    out = capsys.readouterr().out
    job = tmp_path / "storage" / "killed"
    assert (job / ".fault_injected_at_4").exists(), "the worker process died after its step-4 report"
    assert "resuming at step 4/6" in out, "the retry resumed from the checkpoint reported just before the kill"
    assert len([d for d in job.glob("checkpoint_*") if d.is_dir()]) == 1, "no untracked checkpoint folder is left (keep_checkpoints=1)"
    assert _history(uri, killed.run_id, "loss") == [1, 2, 3, 4, 5, 6], "no step logged twice"
    from helpers import same_weights

    same_weights(killed.model_file, ref.model_file)


def test_tracking_unavailable_is_one_line():
    err = TrackingUnavailable("http://127.0.0.1:1", "Connection refused", "training finished")
    assert "\n" not in str(err) and "http://127.0.0.1:1" in str(err)


def test_marking_a_run_failed_on_a_dead_server_takes_seconds_not_minutes(capsys):
    tic = time.perf_counter()
    tracking.fail_if_running("http://127.0.0.1:9", "0" * 32)  # nothing listens on port 9
    assert time.perf_counter() - tic < 10
    assert "http://127.0.0.1:9 is unreachable" in capsys.readouterr().out
