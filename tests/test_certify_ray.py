"""Certification on real Ray clusters: the counts and radii do not depend on the number of
workers or nodes, on a killed actor, or on an interrupted and rerun job; the certification is
tracked in a real MLflow server as a child of the run that trained the model."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from helpers import make_model

from rayrcm.certify import Smoother, certify, predict
from rayrcm.models.export import build_from_file
from rayrcm.orchestration import certify_job, tracking

pytestmark = pytest.mark.slow

SKIP = 12  # 30 of the 360 digits test images


def _cfg(model, out, name, workers=1, *extra):
    return certify_job.config_from_args([
        f"model={model}", f"out_dir={out}", f"name={name}", "tracking.enabled=false", "smoothing.sigma=0.25",
        "smoothing.n0=100", "smoothing.n=1000", "smoothing.chunk=500", f"smoothing.skip={SKIP}", "compute.batch=200",
        f"compute.workers={workers}", "compute.flush_every=1", "compute.progress_every_s=2", *extra])


@pytest.fixture(scope="module")
def setup(tmp_path_factory, two_node_cluster):
    tmp = tmp_path_factory.mktemp("certify")
    model_file = make_model(tmp / "model.pt", seed=1)
    p = certify_job.prepare(_cfg(model_file, tmp / "out", "reference"))
    model, meta = build_from_file(model_file)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the actors
    sm = Smoother(model, 10, sigma=0.25, batch=200, block=100, device="cpu")
    ref = {}
    for pos, idx in enumerate(p.indices):
        cert, sel, est, _ = certify(sm, p.images[pos].float().div_(255), n0=100, n=1000, alpha=0.001, seed=0, index=idx, chunk=500)
        ref[idx] = (cert, sel.tolist(), est.tolist())
    torch.set_num_threads(threads)
    assert len({c.prediction for c, *_ in ref.values()}) > 1, "a model with varied answers makes a sharper test"
    return tmp, model_file, ref, two_node_cluster


def _assert_reference(rows, ref):
    assert sorted(rows["idx"]) == sorted(ref) and not rows["idx"].duplicated().any()
    for r in rows.itertuples():
        cert, sel, est = ref[r.idx]
        assert list(r.counts_selection) == sel and list(r.counts_estimation) == est, r.idx
        assert r.predict == cert.prediction and r.radius == cert.radius and r.p_a_lower == cert.p_a_lower


def test_one_worker_and_three_workers_on_two_nodes_give_the_single_process_counts(setup):
    import ray

    tmp, model_file, ref, _ = setup
    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    one = certify_job.run(_cfg(model_file, tmp / "out", "one-worker", 1))
    three = certify_job.run(_cfg(model_file, tmp / "out", "three-workers", 3))  # 1 CPU each: spans both nodes
    _assert_reference(one.rows, ref)
    _assert_reference(three.rows, ref)
    tsv = (three.out / "results.tsv").read_text().splitlines()
    assert tsv[0] == "idx\tlabel\tpredict\tradius\tcorrect\ttime" and len(tsv) == 1 + len(ref)


def test_predict_on_two_nodes_gives_the_single_process_answers(setup):
    tmp, model_file, _, _ = setup
    cfg = _cfg(model_file, tmp / "out", "predict", 3, "mode=predict", "smoothing.alpha=0.01")
    p = certify_job.prepare(cfg)  # before the run: its images are the ones still to do
    result = certify_job.run(cfg)
    model, _ = build_from_file(model_file)
    torch.set_num_threads(1)
    sm = Smoother(model, 10, sigma=0.25, batch=200, block=100, device="cpu")
    by_idx = {r.idx: r for r in result.rows.itertuples()}
    assert len(by_idx) == len(p.indices)
    for pos, idx in enumerate(p.indices):
        pred, counts, _ = predict(sm, p.images[pos].float().div_(255), n=1000, alpha=0.01, seed=0, index=idx, chunk=500)
        assert by_idx[idx].predict == pred.prediction and list(by_idx[idx].counts) == counts.tolist()
    assert (result.out / "results.tsv").read_text().splitlines()[0] == "idx\tlabel\tpredict\tcorrect\ttime"


def _count_actors():
    from ray._private import state

    return [a for a in state.actors().values() if "CountActor" in a["ActorClassName"]]


def test_a_killed_actor_does_not_change_any_result(setup):
    tmp, model_file, ref, _ = setup
    out: dict = {}
    job = threading.Thread(target=lambda: out.setdefault("result", certify_job.run(_cfg(model_file, tmp / "out", "killed", 2))))
    job.start()
    rows_dir = tmp / "out" / "killed" / "rows"
    deadline = time.time() + 120
    while time.time() < deadline and not (rows_dir.is_dir() and any(rows_dir.glob("part-*.parquet"))):
        time.sleep(0.1)
    victim = next(a for a in _count_actors() if a["State"] == "ALIVE")
    os.kill(victim["Pid"], signal.SIGKILL)  # a worker process of this test's own cluster
    job.join(timeout=300)
    result = out["result"]
    assert result.computed == len(ref)
    _assert_reference(result.rows, ref)
    after = {a["ActorID"]: a for a in _count_actors()}
    assert after[victim["ActorID"]]["NumRestarts"] >= 1, "the killed actor was restarted by Ray Data"


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.glob("part-*.parquet")}


def test_an_interrupted_job_rerun_finishes_the_rest_without_duplicates(setup):
    tmp, model_file, ref, cluster = setup
    argv = [sys.executable, "-m", "rayrcm.cli", "certify", "--model", str(model_file), "--out", str(tmp / "out"),
            "--name", "interrupted", "--sigma", "0.25", "--n0", "100", "--n", "1000", "--chunk", "500", "--skip", str(SKIP),
            "--batch", "200", "--workers", "1", "--set", "tracking.enabled=false", "--set", "compute.flush_every=1"]
    env = {**os.environ, "RAY_ADDRESS": cluster.address}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows_dir = tmp / "out" / "interrupted" / "rows"
    deadline = time.time() + 180
    while time.time() < deadline and len(list(rows_dir.glob("part-*.parquet")) if rows_dir.is_dir() else []) < 3:
        time.sleep(0.05)
    proc.kill()  # the driver dies mid-job
    proc.wait()
    before = _digest(rows_dir)
    done = len(certify_job.read_results(tmp / "out" / "interrupted"))
    assert 3 <= done < len(ref), f"interrupted after {done} images"
    result = certify_job.run(_cfg(model_file, tmp / "out", "interrupted", 2))
    assert result.computed == len(ref) - done
    _assert_reference(result.rows, ref)
    after = _digest(rows_dir)
    assert all(after[name] == digest for name, digest in before.items()), "finished parts are never rewritten"
    again = certify_job.run(_cfg(model_file, tmp / "out", "interrupted", 2))
    assert again.computed == 0 and _digest(rows_dir) == after


def test_another_protocol_under_the_same_name_is_refused(setup):
    from rayrcm.errors import ConfigError

    tmp, model_file, _, _ = setup
    with pytest.raises(ConfigError, match="another protocol"):
        certify_job.prepare(_cfg(model_file, tmp / "out", "one-worker", 1, "smoothing.sigma=0.5"))


def test_certification_is_tracked_under_the_model_run(setup, mlflow_server):
    from mlflow.tracking import MlflowClient

    tmp, model_file, _, _ = setup
    train_run = tracking.start_job_run(mlflow_server, "cert-e2e", "train-job", {"method.sigma": 0.25})
    tracking.log_model(mlflow_server, train_run, model_file, register_as="cert-model", alias="sigma-0_25")
    tracking.end_run(mlflow_server, train_run, ok=True)
    cfg = _cfg("models:/cert-model@sigma-0_25", tmp / "out", "tracked", 2, f"tracking.uri={mlflow_server}",
               "tracking.enabled=true", "smoothing.skip=60")
    result = certify_job.run(cfg)
    client = MlflowClient(mlflow_server)
    run = client.get_run(result.run_id)
    assert run.data.tags["mlflow.parentRunId"] == train_run and run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "cert-e2e"
    p = run.data.params
    assert (p["protocol.sigma"], p["protocol.n"], p["protocol.n0"], p["protocol.alpha"]) == ("0.25", "1000", "100", "0.001")
    assert p["model"] == "models:/cert-model@sigma-0_25" and p["protocol.model_sha256"] == hashlib.sha256(model_file.read_bytes()).hexdigest()
    assert run.data.metrics["certified_acc_0.00"] == pytest.approx(result.metrics["certified_acc_0.00"])
    assert "acr" in run.data.metrics and run.data.metrics["images"] == 6
    names = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"results.tsv", "protocol.json", "table.md", "table.tex", "certified_accuracy.png", "rows"} <= names
    assert {a.path for a in client.list_artifacts(result.run_id, "rows")} and all(
        a.path.startswith("rows/part-") for a in client.list_artifacts(result.run_id, "rows"))  # not rows/rows/
    certify_job.analyze([str(result.out), str(tmp / "out" / "one-worker" / "results.tsv")], tracking_uri=mlflow_server)
    assert {a.path for a in client.list_artifacts(result.run_id, "analysis")} >= {"analysis/table.md", "analysis/certified_accuracy.png"}
    from rayrcm.orchestration.analyze import compare

    paper = compare([result.run_id], tracking_uri=mlflow_server)  # by run id, as the README offers, on the real job's run
    assert list(paper.table.index) == ["cert-model@sigma-0_25"]  # the row is the model, named as it was given
    assert paper.table.loc["cert-model@sigma-0_25", "r=0.00"] == pytest.approx(result.metrics["certified_acc_0.00"])
    assert paper.table.loc["cert-model@sigma-0_25", "ACR"] == pytest.approx(run.data.metrics["acr"])
    again = certify_job.run(cfg)
    assert again.run_id == result.run_id and again.computed == 0


def test_a_lost_node_does_not_change_any_result(setup):
    tmp, model_file, ref, cluster = setup
    out: dict = {}
    job = threading.Thread(target=lambda: out.setdefault("result", certify_job.run(_cfg(model_file, tmp / "out", "node-lost", 3))))
    job.start()
    rows_dir = tmp / "out" / "node-lost" / "rows"
    deadline = time.time() + 120
    while time.time() < deadline and not (rows_dir.is_dir() and any(rows_dir.glob("part-*.parquet"))):
        time.sleep(0.1)
    worker_node = next(iter(cluster.worker_nodes))
    on_node = [a["Pid"] for a in _count_actors() if a["State"] == "ALIVE" and a["Address"]["NodeID"] == worker_node.node_id]
    cluster.remove_node(worker_node)  # its raylet dies; the actors on it are lost to the job
    cluster.add_node(num_cpus=2)  # a replacement node, as an autoscaler would provide
    try:
        job.join(timeout=300)
        assert not job.is_alive(), "the job did not finish after losing a node"
        result = out["result"]
        assert result.computed == len(ref)
        _assert_reference(result.rows, ref)
    finally:
        for pid in on_node:  # worker processes of the removed node, started by this test
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_input_specific_sampling_on_one_and_three_workers_gives_the_single_process_certificates(setup):
    """``--sampling iss``: each image's estimation draws are planned from its selection draws
    inside the actor; the rows equal the single-process ISS reference on 1 and 3 workers over two
    nodes, record the draws spent, and analyze shows the total; the fixed job's name refuses it."""
    from rayrcm.analysis import total_samples
    from rayrcm.certify import SampleSizePlan, certify_iss
    from rayrcm.errors import ConfigError

    tmp, model_file, ref_fixed, _ = setup
    iss = ("smoothing.sampling=iss", "smoothing.max_decline=0.1", "smoothing.n0=200", "smoothing.n=2000")
    cfg = _cfg(model_file, tmp / "out", "iss-one", 1, *iss)
    p = certify_job.prepare(cfg)
    model, _ = build_from_file(model_file)
    torch.set_num_threads(1)
    sm = Smoother(model, 10, sigma=0.25, batch=200, block=100, device="cpu")
    plan = SampleSizePlan(n=2000, sigma=0.25, alpha=0.001, max_decline=0.1)
    ref = {}
    for pos, idx in enumerate(p.indices):
        ref[idx] = certify_iss(sm, p.images[pos].float().div_(255), plan, n0=200, alpha=0.001, seed=0, index=idx, chunk=500)
    one = certify_job.run(cfg)
    three = certify_job.run(_cfg(model_file, tmp / "out", "iss-three", 3, *iss))
    for result in (one, three):
        rows = result.rows.set_index("idx")
        assert sorted(rows.index) == sorted(ref)
        for idx, (cert, sel, est) in ref.items():
            r = rows.loc[idx]
            assert list(r.counts_selection) == sel.tolist() and list(r.counts_estimation) == est.tolist()
            assert r.predict == cert.prediction and r.radius == cert.radius and r.n == est.sum()
            assert r.samples == 200 + est.sum()
    assert len({int(n) for n in one.rows["n"]}) > 1, "sample sizes differ between images"
    assert total_samples(one.rows) < len(ref) * 2200 and one.metrics["samples"] == total_samples(one.rows)
    proto = (one.out / "protocol.json").read_text()
    assert '"sampling": "iss"' in proto and '"max_decline": 0.1' in proto
    table, _ = certify_job.analyze([str(one.out)], log=False)
    assert table.loc[one.name, "samples"] == total_samples(one.rows)
    with pytest.raises(ConfigError, match="sampling"):  # the fixed job's folder, another sampling mode
        certify_job.prepare(_cfg(model_file, tmp / "out", "one-worker", 1, "smoothing.sampling=iss"))
    assert len(ref_fixed) == len(ref)


def test_sequential_sampling_on_one_and_three_workers_gives_the_single_process_certificates(setup):
    """``--sampling sequential``: an actor certifies its images side by side until each one's radii are
    decided; the rows equal the single-process reference (one image at a time, another batch) on 1 and
    3 workers over two nodes; the protocol records the radii and the cap; the table reads certified
    accuracy at the radii with the draws per image, and leaves ACR empty."""
    import math

    from rayrcm.certify.sequential import certify_sequential

    tmp, model_file, _, _ = setup
    radii = (0.0, 0.25, 0.5)
    seq = ("smoothing.sampling=sequential", "smoothing.radii=0,0.25,0.5", "smoothing.n=5000", "compute.sequential_images=4")
    cfg = _cfg(model_file, tmp / "out", "seq-one", 1, *seq)
    p = certify_job.prepare(cfg)
    model, _ = build_from_file(model_file)
    torch.set_num_threads(1)
    sm = Smoother(model, 10, sigma=0.25, batch=100, block=100, device="cpu")
    ref = {idx: certify_sequential(sm, p.images[pos].float().div_(255), int(p.labels[pos]), radii=radii, alpha=0.001,
                                   n_max=5000, seed=0, index=idx, chunk=500) for pos, idx in enumerate(p.indices)}
    one = certify_job.run(cfg)
    three = certify_job.run(_cfg(model_file, tmp / "out", "seq-three", 3, *seq))
    for result in (one, three):
        rows = result.rows.set_index("idx")
        assert sorted(rows.index) == sorted(ref)
        for idx, res in ref.items():
            r = rows.loc[idx]
            assert tuple(r.decisions) == res.decisions and r.n_a == res.successes and r.samples == res.samples
            assert r.p_a_lower == res.p_lower and r.p_upper == res.p_upper and r.radius == (res.radius if r.correct else 0)
    assert len({tuple(d) for d in one.rows["decisions"]}) > 1, "images decided differently"
    proto = json.loads((one.out / "protocol.json").read_text())
    assert proto["sampling"] == "sequential" and proto["radii"] == [0.0, 0.25, 0.5] and proto["n0"] == 0
    assert proto["n"] == 5000 and proto["alpha"] == 0.001 and proto["precision"] == "fp32"
    assert list(one.table.columns[:3]) == ["0.00", "0.25", "0.50"] and "0.75" not in one.table.columns
    assert math.isnan(one.table.loc[one.name, "ACR"]) and "acr" not in one.metrics
    assert one.metrics["samples_per_image_max"] == max(r.samples for r in ref.values())
    assert one.metrics["certified_acc_0.25"] == sum(r.decisions[1] == 1 for r in ref.values()) / len(ref)
