"""Honest certification metrics: nothing is reported at radii the protocol cannot reach (with n
draws no radius exceeds sigma * Phi^-1(alpha^(1/n))), that maximum is logged, and progress
counters are named as progress, never as results."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from helpers import make_model
from scipy.stats import norm

from rayrcm.analysis import summary_metrics, summary_table, to_markdown
from rayrcm.certify.stats import certify_from_counts, lower_confidence_bound, max_certifiable_radius
from rayrcm.orchestration import certify_job


def test_the_reachable_maximum_is_sigma_times_phi_inverse_of_alpha_to_the_one_over_n():
    # the one-sided Clopper-Pearson lower bound of n successes in n draws is alpha^(1/n)
    assert lower_confidence_bound(1000, 1000, 0.001) == pytest.approx(0.001 ** (1 / 1000), rel=1e-9)
    reach = max_certifiable_radius(1000, 0.001, 0.25)
    assert reach == pytest.approx(0.25 * norm.ppf(0.001 ** (1 / 1000)), rel=1e-9)
    assert 0.61 < reach < 0.62
    # the best possible counts certify exactly that radius, never more
    best = certify_from_counts(np.array([100, 0]), np.array([1000, 0]), sigma=0.25, alpha=0.001)
    assert best.radius == pytest.approx(reach)
    assert max_certifiable_radius(100_000, 0.001, 0.25) > 0.9  # the papers' n reaches further


def _rows(radii: list[float], correct: list[int]) -> pd.DataFrame:
    n = len(radii)
    return pd.DataFrame({"idx": range(n), "label": [0] * n, "predict": [0] * n, "radius": radii,
                         "correct": correct, "time": [0.1] * n})


def test_metrics_and_table_stop_at_the_reachable_radius():
    rows = _rows([0.6, 0.3, 0.0, 0.61], [1, 1, 0, 1])
    reach = max_certifiable_radius(1000, 0.001, 0.25)
    m = summary_metrics(rows, max_radius=reach)
    assert set(k for k in m if k.startswith("certified_acc_")) == {"certified_acc_0.00", "certified_acc_0.25",
                                                                  "certified_acc_0.50"}
    assert m["max_certifiable_radius"] == pytest.approx(reach)
    table = summary_table({"run": rows}, max_radii={"run": reach})
    assert [c for c in table.columns if c[0].isdigit()] == ["0.00", "0.25", "0.50"]
    # explicit radii beyond a run's reach are left empty, not reported as a measured 0
    md = to_markdown(summary_table({"run": rows}, [0.0, 0.5, 1.0], max_radii={"run": reach}))
    assert md.splitlines()[-1].split(" | ")[3] == "-"


def _digits_certify(tmp_path, name: str, *extra: str):
    model = make_model(tmp_path / "model.pt", seed=1)
    return certify_job.config_from_args([
        f"model={model}", f"out_dir={tmp_path / 'out'}", f"name={name}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "smoothing.sigma=0.25", "smoothing.n0=100", "smoothing.n=1000", "smoothing.chunk=500", "smoothing.skip=60",
        "compute.batch=200", "compute.workers=1", "compute.flush_every=1", "compute.progress_every_s=0", *extra])


@pytest.fixture
def own_ray(isolated_home):
    """A real local Ray for this test, shut down after it unless it was running before (later
    tests check that bad input never starts Ray)."""
    import ray

    was = ray.is_initialized()
    if not was:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=True)
    yield ray
    if not was:
        ray.shutdown()


@pytest.mark.slow
def test_a_certification_logs_no_unreachable_radius_and_no_progress_as_results(tmp_path, own_ray, capsys):
    from mlflow.tracking import MlflowClient

    result = certify_job.run(_digits_certify(tmp_path, "honest"))
    reach = max_certifiable_radius(1000, 0.001, 0.25)
    out = capsys.readouterr().out
    assert "0.75" not in out.split("| run |", 1)[1].splitlines()[0]  # the printed table stops at the reach
    assert f"{reach:.3f}" in out
    assert result.metrics["max_certifiable_radius"] == pytest.approx(reach)
    assert not any(k.startswith("certified_acc_") and float(k.rsplit("_", 1)[1]) > reach for k in result.metrics)
    assert not {"images_done", "samples_per_s", "wall_seconds"} & set(result.metrics)

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(result.run_id)
    logged = run.data.metrics
    assert logged["max_certifiable_radius"] == pytest.approx(reach)
    assert float(run.data.params["max_certifiable_radius"]) == pytest.approx(reach, abs=1e-6)
    assert not any(k.startswith("certified_acc_") and float(k.rsplit("_", 1)[1]) > reach for k in logged)
    assert not {"images_done", "samples_per_s", "wall_seconds"} & set(logged), sorted(logged)
    assert {"progress/images_done", "progress/samples_per_s"} <= set(logged)
    assert "0.75" not in (result.out / "table.md").read_text()

    # rayrcm analyze reads the protocol and stops the grid there too; its explicit radii beyond it stay empty
    table, _ = certify_job.analyze([str(result.out)], log=False)
    assert [c for c in table.columns if c[0].isdigit()] == ["0.00", "0.25", "0.50"]
    table, _ = certify_job.analyze([str(result.out)], radii=[0.0, 1.0], log=False)
    assert np.isnan(table["1.00"].iloc[0])
    assert json.loads((result.out / "protocol.json").read_text())["n"] == 1000
