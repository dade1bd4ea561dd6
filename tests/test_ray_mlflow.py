"""End to end on a real local Ray cluster (2 CPU workers, DDP) and a real MLflow server.

* a 2-worker run logs params once and each metric step once (rank 0 only), registers its model,
  and the alias resolves to a model that predicts exactly like the checkpoint file;
* a worker that fails at step 3 with max_failures=1 resumes from the step-2 checkpoint and ends
  with the same weights as the uninterrupted run;
* a job that failed for good, rerun under the same name, resumes (same MLflow run, no step twice)
  and ends with the same weights too.
"""

from __future__ import annotations

import pytest
import torch
from helpers import same_weights

from rayrcm.config import ExperimentConfig, apply_overrides
from rayrcm.models.export import build_from_file
from rayrcm.orchestration import tracking
from rayrcm.orchestration.trainer import fit

pytestmark = pytest.mark.slow


def _cfg(tmp_path, uri, name, *extra):
    return apply_overrides(ExperimentConfig(), [
        "method.name=gaussian", "method.sigma=0.25", "data.image_size=8", "model.patch_size=4",
        "data.batch_size=32", "train.steps=6", "train.workers=2", "train.checkpoint_every=2", "train.log_every=2",
        "train.eval_sigmas=0.25", f"train.storage_path={tmp_path / 'storage'}", f"train.name={name}",
        f"tracking.uri={uri}", "tracking.experiment=e2e", *extra])


@pytest.fixture(scope="module")
def reference(tmp_path_factory, ray_cluster, mlflow_server):
    tmp = tmp_path_factory.mktemp("ref")
    cfg = _cfg(tmp, mlflow_server, "reference", "tracking.register_as=e2e-model", "tracking.alias=sigma-0_25")
    return tmp, fit(cfg)


def test_run_is_tracked_once_and_registered(reference, mlflow_server):
    from mlflow.tracking import MlflowClient

    _, result = reference
    client = MlflowClient(mlflow_server)
    run = client.get_run(result.run_id)
    assert run.data.params["optim.lr"] == "0.001" and run.data.params["train.workers"] == "2"
    assert run.data.tags["rayrcm.job"] == "reference" and run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(result.run_id, "loss")]
    assert steps == [2, 4, 6], "each step logged once, by rank 0 only"
    assert 0.0 <= run.data.metrics["test_acc_clean"] <= 1.0
    mv = client.get_model_version_by_alias("e2e-model", "sigma-0_25")
    assert mv.run_id == result.run_id and mv.tags["sigma"] == "0.25" and mv.tags["method"] == "gaussian"
    model, meta = tracking.load_model("models:/e2e-model@sigma-0_25", mlflow_server)
    direct, _ = build_from_file(result.model_file)
    model.eval(), direct.eval()
    x = torch.rand(8, 3, 8, 8)
    assert torch.equal(model(x), direct(x)) and meta["stage"] == "classifier"
    by_run, _ = tracking.load_model(result.run_id, mlflow_server)
    assert torch.equal(by_run.eval()(x), direct(x))


def test_worker_failure_resumes_to_the_same_weights(reference, mlflow_server):
    tmp, ref = reference
    result = fit(_cfg(tmp, mlflow_server, "faulty", "train.fault_at_step=3", "train.max_failures=1"))
    assert (tmp / "storage" / "faulty" / ".fault_injected_at_3").exists()
    assert result.metrics["step"] == 6
    same_weights(result.model_file, ref.model_file)


def test_rerun_of_a_failed_job_resumes(reference, mlflow_server):
    from mlflow.tracking import MlflowClient

    tmp, ref = reference
    cfg = _cfg(tmp, mlflow_server, "rerun", "train.fault_at_step=3", "train.max_failures=0")
    from ray.train import TrainingFailedError

    with pytest.raises(TrainingFailedError, match="injected worker failure"):
        fit(cfg)
    client = MlflowClient(mlflow_server)
    failed = client.search_runs([client.get_experiment_by_name("e2e").experiment_id], "tags.`rayrcm.job` = 'rerun'")
    assert len(failed) == 1 and failed[0].info.status == "FAILED"
    result = fit(cfg)  # same job name: resumes from the step-2 checkpoint
    assert result.run_id == failed[0].info.run_id
    assert [m.step for m in client.get_metric_history(result.run_id, "loss")] == [2, 4, 6]
    same_weights(result.model_file, ref.model_file)


def test_consistency_fine_tuning_keeps_the_model_best_on_validation(reference, mlflow_server):
    """Selection uses the held-out validation split, never the test set: the exported model is the
    checkpoint with the highest val_acc_sigma_0.25 (first one on ties), and the test accuracies
    reported are those of that model."""
    from mlflow.tracking import MlflowClient

    tmp, _ = reference
    result = fit(_cfg(tmp, mlflow_server, "consistency-select", "method.name=consistency", "method.sigma=0.25",
                      "method.lbd=10", "method.eta=0.5", "train.select_metric=val_acc_sigma_0.25"))
    client = MlflowClient(mlflow_server)
    history = client.get_metric_history(result.run_id, "val_acc_sigma_0.25")
    assert [m.step for m in history] == [2, 4, 6]
    best = max(history, key=lambda m: (m.value, -m.step))
    assert result.metrics["selected_step"] == best.step and result.metrics["selected_value"] == pytest.approx(best.value)
    same_weights(result.model_file, tmp / "storage" / "consistency-select" / "best_model.pt")
    assert "test_acc_sigma_0.25" in result.metrics
