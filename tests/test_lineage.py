"""A researcher's first day: registry aliases that only move when asked (and say so), the lineage
pretrain -> fine-tune -> sweep trial in MLflow (the reference as given, the source run tagged and
linked), and sweeps that read well: trials named by their values in MLflow and TensorBoard, scalars
against the training step without Tune's bookkeeping, no Tune status tables by default.

Fast tests use a real MLflow server only; the end-to-end ones a real Ray cluster too, on 8 px
digits for a few steps."""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import pytest
from helpers import make_model

from rayrcm.config import ExperimentConfig, apply_overrides
from rayrcm.errors import ConfigError
from rayrcm.orchestration import lineage, sweep, tracking

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))


def _run(uri: str, experiment: str, job: str) -> str:
    return tracking.start_job_run(uri, experiment, job, {"x": 1})


@pytest.mark.slow  # a real MLflow server
def test_alias_moves_are_printed_and_tagged(mlflow_server, tmp_path, capsys):
    from mlflow import MlflowClient

    model = make_model(tmp_path / "model.pt")
    first, second = _run(mlflow_server, "alias-log", "quick"), _run(mlflow_server, "alias-log", "other")
    v1 = tracking.log_model(mlflow_server, first, model, register_as="alias-log", alias="sigma-0_25")
    v2 = tracking.log_model(mlflow_server, second, model, register_as="alias-log", alias="sigma-0_25")
    out = capsys.readouterr().out
    assert "[rayrcm] alias alias-log@sigma-0_25: (unset) -> v1" in out
    assert "[rayrcm] alias alias-log@sigma-0_25: v1 -> v2" in out
    assert v1["alias_change"].endswith("(unset) -> v1") and v2["alias_change"].endswith("v1 -> v2")
    client = MlflowClient(mlflow_server)
    assert client.get_run(second).data.tags[tracking.ALIAS_CHANGE_TAG] == "alias alias-log@sigma-0_25: v1 -> v2"
    assert client.get_model_version("alias-log", "2").tags[tracking.ALIAS_CHANGE_TAG].endswith("v1 -> v2")


def _digits(tmp_path: Path, uri: str, experiment: str, name: str, *extra: str) -> ExperimentConfig:
    """The quickstart's fine-tuning at 8 px for 2 steps on 1 worker."""
    from rayrcm.quickstart import finetune_config

    return apply_overrides(finetune_config(), [
        "data.image_size=8", "model.patch_size=4", "data.batch_size=32", "train.steps=2", "train.workers=1",
        "train.checkpoint_every=1", "train.log_every=1", "train.eval_sigmas=0.25", "optim.warmup_steps=0", f"train.storage_path={tmp_path}", f"train.name={name}", f"tracking.uri={uri}",
        f"tracking.experiment={experiment}", *extra])


@pytest.mark.slow  # a real MLflow server
def test_a_sweep_never_moves_another_jobs_alias_unasked(isolated_home, mlflow_server, tmp_path):
    """The quickstart registered v1 as rcm-digits@sigma-0_25: a sweep of the same recipe takes
    its own alias by default, and one that names sigma-0_25 is refused before any training, with
    one line naming the setting that allows it."""
    import ray

    quick = _run(mlflow_server, "alias-guard", "quickstart-finetune")
    tracking.log_model(mlflow_server, quick, make_model(tmp_path / "model.pt"), register_as="guard-digits",
                       alias="sigma-0_25", version_tags={"job": "quickstart-finetune"})
    base = _digits(tmp_path, mlflow_server, "alias-guard", "guard-ft", "tracking.register_as=guard-digits")
    space = {"method.lbd": "grid:5"}
    _, sw, _ = sweep.validate_sweep(base, sweep.SweepConfig(space=space))
    assert sw.alias == "guard-ft-sweep" and sw.register_as == "guard-digits"
    was = ray.is_initialized()
    with pytest.raises(ConfigError) as err:
        sweep.run(base, sweep.SweepConfig(space=space, alias="sigma-0_25", name="guard", scheduler="fifo"))
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("sweep.alias='sigma-0_25'")
    assert "points at v1" in msg and "quickstart-finetune" in msg and "sweep.move_alias=true" in msg
    assert ray.is_initialized() == was  # refused before any Ray work
    assert tracking.alias_target(mlflow_server, "guard-digits", "sigma-0_25")[0] == 1


# --- end to end: pretrain -> fine-tune -> sweep ------------------------------------------------


def _events(folder: Path) -> dict[str, list[int]]:
    """TensorBoard scalars of a trial folder: tag -> steps (read with tensorboardX's protobufs)."""
    from tensorboardX.proto import event_pb2

    out: dict[str, list[int]] = {}
    for f in folder.glob("events.out.tfevents.*"):
        data = f.read_bytes()
        i = 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            ev = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            for v in ev.summary.value:
                if v.HasField("simple_value"):
                    out.setdefault(v.tag, []).append(ev.step)
    return out


@pytest.fixture(scope="module")
def chain(tmp_path_factory, ray_cluster, mlflow_server):
    """A 2-step pretraining and a fine-tuning from its run id, registered as lineage-digits@sigma-0_25."""
    from rayrcm.orchestration.trainer import fit
    from rayrcm.quickstart import pretrain_config

    tmp = tmp_path_factory.mktemp("lineage")
    pre = fit(apply_overrides(pretrain_config(), [
        "data.image_size=8", "model.patch_size=4", "data.batch_size=32", "train.steps=2", "train.workers=1",
        "train.checkpoint_every=2", "train.log_every=2", "optim.warmup_steps=0", f"train.storage_path={tmp}",
        "train.name=lin-pretrain", f"tracking.uri={mlflow_server}", "tracking.experiment=lineage"]))
    ft = fit(_digits(tmp, mlflow_server, "lineage", "lin-finetune", f"model.init_from={pre.run_id}",
                     "tracking.register_as=lineage-digits"))
    return tmp, pre, ft


@pytest.mark.slow
def test_finetune_records_the_reference_and_links_its_pretraining(chain, mlflow_server):
    from mlflow import MlflowClient

    _, pre, ft = chain
    client = MlflowClient(mlflow_server)
    run = client.get_run(ft.run_id)
    assert run.data.params["model.init_from"] == pre.run_id  # as given, not the downloaded file
    assert run.data.tags[lineage.SOURCE_RUN_TAG] == pre.run_id
    note = run.data.tags[lineage.NOTE_TAG]
    assert f"runs/{pre.run_id})" in note and "lin-pretrain" in note
    assert f"runs/{ft.run_id})" in client.get_run(pre.run_id).data.tags[lineage.NOTE_TAG]  # and back
    assert ft.model["alias_change"] == "alias lineage-digits@sigma-0_25: (unset) -> v1"


@pytest.mark.slow
def test_sweep_trials_are_named_linked_and_leave_the_quickstart_alias(chain, mlflow_server, capfd):
    from mlflow import MlflowClient

    tmp, pre, ft = chain
    base = _digits(tmp, mlflow_server, "lineage", "lin-finetune", f"model.init_from={pre.run_id}",
                   "tracking.register_as=lineage-digits")
    sw = sweep.SweepConfig(space={"method.lbd": "grid:5,20", "optim.lr": "1e-3"}, scheduler="fifo", votes=2,
                           max_concurrent_trials=2)
    result = sweep.run(base, sw)
    out = capfd.readouterr().out
    assert "Trial status" not in out and "╭" not in out  # Tune's tables: --verbose only
    assert "[rayrcm] alias lineage-digits@lin-finetune-sweep: (unset) -> v2" in out

    client = MlflowClient(mlflow_server)
    assert client.get_model_version_by_alias("lineage-digits", "sigma-0_25").version == "1"  # untouched
    parent = client.get_run(result.parent_run_id)
    assert parent.data.params["base.model.init_from"] == pre.run_id
    assert parent.data.tags[lineage.SOURCE_RUN_TAG] == pre.run_id
    assert f"runs/{result.best['run_id']})" in parent.data.tags[lineage.NOTE_TAG]
    assert parent.data.tags[tracking.ALIAS_CHANGE_TAG].endswith("(unset) -> v2")
    trials = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    names = sorted(r.info.run_name for r in trials)
    assert [n.split(" [")[0] for n in names] == ["lbd=20", "lbd=5"]  # values first: distinct when truncated
    for r in trials:
        assert r.data.params["model.init_from"] == pre.run_id and r.data.tags[lineage.SOURCE_RUN_TAG] == pre.run_id
        assert f"runs/{parent.info.run_id})" in r.data.tags[lineage.NOTE_TAG]
    # the pretraining run's description links the sweep once, not a line per trial
    pre_note = client.get_run(pre.run_id).data.tags[lineage.NOTE_TAG]
    assert f"runs/{parent.info.run_id})" in pre_note and not [r for r in trials if f"runs/{r.info.run_id})" in pre_note]
    best = client.get_model_version_by_alias("lineage-digits", "lin-finetune-sweep")
    assert best.tags["sweep"] == "lin-finetune-sweep" and best.tags["job"].startswith("lin-finetune-sweep-")

    folders = sorted(p for p in result.folder.iterdir() if p.is_dir() and "lbd=" in p.name)
    assert sorted(p.name.split("-", 1)[1] for p in folders) == ["lbd=20", "lbd=5"]
    for folder in folders:
        scalars = _events(folder)
        assert scalars and not [t for t in scalars if t in ("done", "step") or "time_" in t or t.startswith("ray/")]
        assert scalars["loss"] == [1, 2]  # the training step is the x axis


def test_finished_runs_open_the_runs_list_with_their_headline_metrics(tmp_path):
    """A finished job adds its headline metrics to the experiment's saved view, in a fixed order
    (stage, test accuracy, certified accuracy by radius, ACR, abstention, robustness), where the
    installed MLflow UI reads a shared view (its bundle names the tag prefix and the URL key, and
    writes a column as ``metrics.`name```)."""
    import json

    import mlflow.server
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    train = _run(uri, "view", "finetune")
    for k, v in {"test_acc_sigma_0.25": 0.9, "loss": 0.3, "test_acc_clean": 0.95, "throughput": 100.0}.items():
        client.log_metric(train, k, v)
    lineage.finish_run(uri, train)
    cert = _run(uri, "view", "certify")
    for k, v in {"acr": 0.4, "certified_acc_0.25": 0.8, "certified_acc_0.00": 0.9, "abstain_rate": 0.05,
                 "samples": 1e5}.items():
        client.log_metric(cert, k, v)
    lineage.finish_run(uri, cert)
    exp = client.get_experiment_by_name("view")
    state = json.loads(exp.tags[lineage.VIEW_TAG])
    assert state["selectedColumns"] == ["tags.`rayrcm.stage`", "metrics.`test_acc_clean`", "metrics.`test_acc_sigma_0.25`",
                                        "metrics.`certified_acc_0.00`", "metrics.`certified_acc_0.25`", "metrics.`acr`",
                                        "metrics.`abstain_rate`"]
    assert client.get_run(cert).info.status == "FINISHED"
    bundle = "".join(p.read_text(errors="ignore") for p in
                     (Path(mlflow.server.__file__).parent / "js" / "build" / "static" / "js").glob("*.js"))
    assert lineage.VIEW_TAG.rsplit(".", 1)[0] + "." in bundle and "viewStateShareKey" in bundle
    assert '+".`"+' in bundle.replace(" ", "")  # the UI's column key: type + ".`" + name + "`"
    assert lineage.update_runs_view(uri, cert) == f"#/experiments/{exp.experiment_id}?viewStateShareKey=rayrcm"


@pytest.mark.slow
def test_a_pretraining_run_logs_its_knn_accuracy_and_embedding_map(chain, mlflow_server):
    """Through Ray Train and a real MLflow server: the encoder stage's k-NN metrics and its t-SNE map."""
    from mlflow import MlflowClient

    _, pre, _ = chain
    client = MlflowClient(mlflow_server)
    metrics = client.get_run(pre.run_id).data.metrics
    assert 0.0 <= metrics["test_knn_acc"] <= 1.0 and "val_knn_acc" in metrics
    logged = {f.path for f in client.list_artifacts(pre.run_id, "embedding")}
    assert logged == {"embedding/embedding.png", "embedding/embedding.csv"}
