"""End to end on digits: ACL pretraining, then SLF and AFF from the same encoder on a real Ray
cluster and MLflow server; AFF is more robust than SLF at the same budget (seeded)."""

from __future__ import annotations

import pytest

from rayrcm.config import ExperimentConfig, apply_overrides
from rayrcm.orchestration.transfer import chain_table, run_all


def test_chain_table_is_the_shared_result_table_of_every_mode():
    """The chain prints what ``rayrcm compare`` prints for the same cells (one code path), in percent."""
    from rayrcm.analysis.compare import metric_cells
    from rayrcm.analysis.paper import Result, paper_table, to_markdown

    rows = {"slf": {"sa": 0.9, "pgd20": 0.1, "aa_apgd": 0.06, "aa": 0.05, "robust_images": 200.0},
            "aff": {"sa": 0.8, "pgd20": 0.5, "robust_images": 200.0}}
    text = chain_table(rows, "t")
    assert text.startswith("**t**") and "| slf | 90.0 | 10.0 | 5.0 | 6.0 |" in text
    assert "| aff | 80.0 | 50.0 | - | - |" in text and "AutoAttack (standard)" in text and "abstention in %" in text
    shared = [Result(m, metric_cells({f"test_{k}": v for k, v in r.items()})["test"], {m}, m) for m, r in rows.items()]
    assert to_markdown(paper_table(shared)) in text


@pytest.mark.slow
def test_acl_then_slf_and_aff_on_digits(ray_cluster, mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    from rayrcm.orchestration.trainer import fit

    common = ["model.encoder=cifar_resnet8", "data.batch_size=64", f"train.storage_path={tmp_path}", f"tracking.uri={mlflow_server}",
              "tracking.experiment=acl-e2e", "train.workers=1", "train.log_every=20", "train.seed=0"]
    pre = apply_overrides(ExperimentConfig(), [*common, "method.name=acl", "method.pgd_steps=2", "data.augmentation=simclr",
                                               "model.proj_hidden_dim=64", "model.proj_dim=32", "train.steps=40",
                                               "train.checkpoint_every=1000", "optim.lr=2e-3", "train.name=acl-e2e-pre"])
    encoder = fit(pre).model_file
    tune = [*common, "method.name=adv_finetune", f"model.init_from={encoder}", "data.val_fraction=0", "optim.name=sgd",
            "optim.lr=0.05", "optim.schedule=step", "optim.milestones=60", "train.steps=80", "train.checkpoint_every=1000",
            "method.pgd_steps=5", "method.eval_max_images=200", "method.eval_aa_iters=10", "method.eval_aa_targets=3", "method.eval_aa_queries=50",
            "train.eval_sigmas=0.25"]
    cfgs = {m: apply_overrides(ExperimentConfig(), [*tune, f"method.mode={m}"]) for m in ("slf", "aff")}
    result = run_all(cfgs, name="acl-e2e-transfer")
    slf, aff = result.rows["slf"], result.rows["aff"]
    assert set(slf) == set(aff) == {"sa", "pgd20", "aa", "aa_apgd", "robust_images"}
    assert aff["pgd20"] > slf["pgd20"] + 0.1
    for row in (slf, aff):
        assert row["sa"] >= row["pgd20"] >= row["aa_apgd"] >= row["aa"]
    client = MlflowClient(mlflow_server)
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["aff_pgd20"] == pytest.approx(aff["pgd20"])
    assert parent.data.metrics["aff_robust_images"] == 200  # compare's counts of the parent run
    assert {a.path for a in client.list_artifacts(result.parent_run_id)} >= {"robustness.md", "robustness.csv"}
    for mode, run_id in result.runs.items():
        child = client.get_run(run_id)
        assert child.data.tags["mlflow.parentRunId"] == result.parent_run_id
        assert child.data.metrics["test_sa"] == pytest.approx(result.rows[mode]["sa"])
