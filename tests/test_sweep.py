"""Sweeps: search-space checks (milliseconds), the smoothed validation metric, and real Ray Tune
sweeps of the digits recipe against a real MLflow server: ASHA stopping a bad trial, parent/child
runs, the alias on the best trial's model, and an interrupted sweep resumed by rerunning it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from rayrcm.config import apply_overrides
from rayrcm.errors import ConfigError
from rayrcm.eval.accuracy import accuracies, count_correct
from rayrcm.orchestration import sweep

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))


def _base(*extra: str):
    import rcm_digits

    return apply_overrides(rcm_digits.finetune_config(0.25), ["train.epochs=2", "train.workers=1", "train.log_every=100",
                                                               *extra])


def test_space_specs_parse():
    assert sweep.parse_spec("method.lbd", "grid:5,10,20") == ("grid", [5, 10, 20])
    assert sweep.parse_spec("optim.lr", "loguniform:1e-4,1e-2") == ("loguniform", [1e-4, 1e-2])
    assert sweep.parse_spec("method.eta", "uniform:0,1") == ("uniform", [0, 1])
    assert sweep.parse_spec("method.m", "randint:2,5") == ("randint", [2, 4])
    assert sweep.parse_spec("data.augmentation", "choice:none,crop") == ("choice", ["none", "crop"])
    assert sweep.parse_spec("method.eta", 0.5) == ("const", [0.5])


@pytest.mark.parametrize("space, fragment", [
    ({"method.bogus": "grid:1,2"}, "method.bogus"),
    ({"method.eta": "uniform:1,1"}, "empty range"),
    ({"method.eta": "grid:"}, "is empty"),
    ({"method.sigma": "grid:-0.25,0.5"}, "value -0.25 fails"),
    ({"optim.lr": "loguniform:0,1e-2"}, "low > 0"),
    ({}, "at least one key"),
])
def test_bad_spaces_rejected_with_one_line(space, fragment):
    with pytest.raises(ConfigError) as err:
        sweep.validate_sweep(_base(), sweep.SweepConfig(space=space))
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_bad_space_on_the_command_line_exits_2_before_ray(capsys):
    import ray
    import rcm_digits

    was = ray.is_initialized()
    with pytest.raises(SystemExit) as ex:
        rcm_digits.main(["tune", "--sigma", "0.25", "--space", "method.sigma=grid:-1,0.5"])
    assert ex.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rayrcm: error: space.method.sigma=")
    assert ray.is_initialized() == was


def test_sweep_metric_and_trial_config():
    base, sw, parsed = sweep.validate_sweep(_base(), sweep.SweepConfig(space={"method.lbd": "grid:5,10"}, votes=4))
    assert sw.metric == "val_smoothed_acc_sigma_0.25" and base.train.select_metric == sw.metric
    assert base.train.eval_votes == 4 and base.train.checkpoint_epochs == 1  # report every epoch
    # the sweep's own alias, not the recipe's sigma-0_25 that its fine-tuning (or the quickstart) holds
    assert sw.name == "rcm-digits-finetune-sigma-0_25-sweep" and sw.alias == "rcm-digits-finetune-sigma-0_25-sweep"
    assert base.train.evals == ("noisy", "smoothed")  # the metric's evaluation joins the user's
    with pytest.raises(ConfigError, match="sweep.metric") as err:
        sweep.validate_sweep(_base(), sweep.SweepConfig(space={"method.lbd": "grid:5"}, metric="val_smoothed_acc_sigma_0.3"))
    assert "\n" not in str(err.value)


def test_trial_evals_keep_the_users_and_add_smoothed_once():
    space = sweep.SweepConfig(space={"method.lbd": "grid:5"})
    assert sweep.validate_sweep(_base("train.evals=smoothed", "train.select_metric="), space)[0].train.evals == ("smoothed",)
    assert sweep.validate_sweep(_base("train.evals=noisy,smoothed"), space)[0].train.evals == ("noisy", "smoothed")
    base, sw, _ = sweep.validate_sweep(_base(), replace(space, metric="val_acc_clean", votes=3))
    assert base.train.select_metric == "val_acc_clean" and base.train.evals == ("noisy", "smoothed")
    assert base.train.eval_votes == 3


def test_bad_sweep_settings_name_their_key():
    for field, value in (("max_failures", -2), ("max_concurrent_trials", -1), ("mode", "best"), ("votes", 0)):
        with pytest.raises(ConfigError, match=f"sweep.{field}"):
            sweep.validate_sweep(_base(), sweep.SweepConfig(space={"method.lbd": "grid:5"}, **{field: value}))


class _Result:
    """What the summary reads of a Tune ``Result``."""

    def __init__(self, trial, lr, curve, error=None):
        import pandas as pd

        self.path, self.config, self.error = f"/tmp/sweep/{trial}", {"optim.lr": lr}, error
        self.metrics_dataframe = pd.DataFrame({"m": curve})


def test_summary_table_and_files(tmp_path):
    grid = [_Result("a", 1e-3, [0.5, 0.7]), _Result("b", 1e-7, [0.1]), _Result("c", 1e-2, [], error=RuntimeError())]
    ends = {"a": {"metrics": {"selected_value": 0.75}, "run_id": "r" * 32}}
    table = sweep.trial_table(grid, ends, "sw", "m", "max", ["optim.lr"])
    assert list(table["trial"]) == ["a", "b", "c"] and list(table["status"]) == ["completed", "stopped", "error"]
    assert table["m"].iloc[0] == 0.75 and table["m"].iloc[1] == 0.1 and list(table["reports"]) == [2, 1, 0]
    assert table["job"].iloc[0] == "sw-a" and table["run_id"].iloc[0] == "r" * 32
    files = sweep.write_summary(tmp_path, table, "sw", "m", ["optim.lr"])
    assert [f.name for f in files] == ["sweep_summary.csv", "sweep_summary.md", "metric_vs_params.png"]
    assert all(f.stat().st_size > 0 for f in files)
    assert "| a | 0.0010 | completed | 2 | 0.7500 |" in files[1].read_text()


def test_sweep_alias_defaults_to_its_own_and_checks_what_is_given():
    space = {"method.lbd": "grid:5"}
    assert sweep.validate_sweep(_base(), sweep.SweepConfig(space=space, name="v2"))[1].alias == "sweep-v2"
    assert sweep.validate_sweep(_base(), sweep.SweepConfig(space=space, alias="mine"))[1].alias == "mine"
    assert sweep.validate_sweep(_base("tracking.alias="), sweep.SweepConfig(space=space))[1].alias == ""
    with pytest.raises(ConfigError, match="sweep.alias") as err:
        sweep.validate_sweep(_base(), sweep.SweepConfig(space=space, alias="sigma 0.25"))
    assert "\n" not in str(err.value)
    assert sweep.config_from_args(["move_alias=true"], []).move_alias is True


class _Trial:
    def __init__(self, trial_id, config):
        self.trial_id, self.config = trial_id, config


def test_trials_are_named_by_their_values():
    parsed = {"method.lbd": ("grid", [5, 20]), "optim.lr": ("loguniform", [1e-4, 1e-2]), "method.eta": ("const", [0.5])}
    keys = sweep.label_keys(parsed)
    assert keys == ["method.lbd", "optim.lr"]
    config = {"method.lbd": 5, "optim.lr": 0.0012345678, "method.eta": 0.5}
    assert sweep.trial_label(config, keys) == "lbd=5 lr=0.001235"
    assert sweep.trial_label({"a.lr": 1, "b.lr": 2}, ["a.lr", "b.lr"]) == "a.lr=1 b.lr=2"  # clashing short names
    name = sweep.TrialNames(keys)(_Trial("a3d56_00000", config))
    assert name == "a3d56_00000-lbd=5,lr=0.001235" and name.split("-", 1)[0] == "a3d56_00000"
    assert sweep.TrialNames(["data.augmentation"])(_Trial("b_1", {"data.augmentation": "a/b c"})) == "b_1-augmentation=a_b_c"


def test_tensorboard_scalars_are_the_trials_own():
    from rayrcm.orchestration.sweep_tensorboard import trial_scalars

    result = {"loss": 0.5, "step": 4, "val_acc_clean": 0.9, "done": False, "time_this_iter_s": 1.0, "time_total_s": 2.0,
              "training_iteration": 2, "timestamp": 1, "pid": 7, "trial_id": "x", "date": "d", "config": {},
              "nan": float("nan"), "flag": True}
    assert trial_scalars(result) == {"loss": 0.5, "val_acc_clean": 0.9}


def test_summary_plot_reads_well_for_a_few_points(tmp_path, monkeypatch):
    """The title fits in the figure, the axes show the swept values without offsets."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    saved = []
    save = Figure.savefig

    def keep(fig, *args, **kwargs):  # the figure as saved, before it is closed
        save(fig, *args, **kwargs)
        saved.append((fig, fig._suptitle.get_window_extent(fig.canvas.get_renderer()), fig.bbox.frozen()))

    monkeypatch.setattr(Figure, "savefig", keep)
    grid = [_Result("a", 2e-3, [0.8412, 0.8413]), _Result("b", 1e-7, [0.8411])]
    ends = {"a": {"metrics": {"selected_value": 0.8413}, "run_id": "r" * 32}}
    name, metric = "rcm-digits-finetune-sigma-0_25-sweep", "val_smoothed_acc_sigma_0.25"
    table = sweep.trial_table(grid, ends, name, "m", "max", ["optim.lr"]).rename(columns={"m": metric})
    sweep.write_summary(tmp_path, table, name, metric, ["optim.lr"])
    ((fig, box, frame),) = saved
    assert box.x0 >= frame.x0 and box.x1 <= frame.x1 and box.y1 <= frame.y1, "the title is cut"
    ax = fig.axes[0]
    assert ax.yaxis.get_major_formatter().get_offset() == ""  # no "+8.411e-1" above the axis
    lo, hi = ax.get_ylim()
    assert lo <= 0.0 and hi >= 1.0  # an accuracy on its whole range
    assert sorted(ax.get_xticks()) == pytest.approx([1e-7, 2e-3])


def test_sweep_modules_call_mlflow_only_through_tracking():
    import ast

    for name in ("sweep", "sweep_space", "sweep_report"):
        tree = ast.parse((REPO / "rayrcm" / "orchestration" / f"{name}.py").read_text())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not {m for m in imported if m.split(".")[0] == "mlflow"}, name
        private = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
                   and n.value.id == "tracking" and n.attr.startswith("_")}
        assert not private, (name, private)


def test_recipe_grids_follow_the_seed_values():
    import rcm_cifar10
    from _rcm_seed import seed_sweep

    for s, cmd in rcm_cifar10.SEED_FINETUNE.items():
        sw = seed_sweep(cmd)
        assert sw.space["method.lbd"] == f"grid:{cmd['lbd'] / 2:g},{cmd['lbd']:g},{cmd['lbd'] * 2:g}"
        assert sweep.parse_spec("method.sigma", sw.space["method.sigma"])[1][0] == pytest.approx(s)  # noise_aug / 2
        assert seed_sweep(cmd, random=True).space["method.lbd"].startswith("loguniform:")


class _Threshold(nn.Module):
    """Class 1 iff the mean pixel exceeds 0.5: under noise the vote is right with a probability
    we know, so majority voting must beat a single draw."""

    def forward(self, x):
        m = x.flatten(1).mean(1)
        return torch.stack([0.5 - m, m - 0.5], 1)


def test_smoothed_accuracy_is_the_majority_vote():
    n = 400
    x = torch.full((n, 1, 2, 2), 0.55)  # mean noise std 0.8/2 = 0.4: one draw is right with P = Phi(0.125) = 0.55
    data = [(x[i], 1) for i in range(n)]
    counts = count_correct(_Threshold(), data, [0.8], votes=101, batch_size=100)
    acc = accuracies(counts, [0.8], "val")
    assert acc["val_acc_clean"] == 1.0
    assert 0.45 < acc["val_acc_sigma_0.8"] < 0.65
    # majority of 101 draws with p = 0.55: P(correct) = P(Bin(101, 0.55) > 50) = 0.84
    assert 0.76 < acc["val_smoothed_acc_sigma_0.8"] < 0.92
    assert "val_smoothed_acc_sigma_0.8" not in accuracies(count_correct(_Threshold(), data, [0.8]), [0.8], "val")


# --- real sweeps ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tune_cluster(isolated_home):
    """A local cluster with the dashboard: Ray Train's placement-group cleaner asks the State API
    whether the controller of a trial that ASHA stopped is gone before it frees the trial's CPUs."""
    import ray

    ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=True, log_to_driver=True)
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_asha_sweep_parent_children_and_alias(tune_cluster, mlflow_server, tmp_path):
    """ASHA ranks trials by certified accuracy (``val_certified_acc_sigma_0.25_r0``: the sequential
    procedure on the validation split, a sound lower bound, at most 1,000 draws per image) and cuts a
    trial that does not learn; parent and child runs, the alias on the best trial's model, the metric
    in MLflow (each report) and in every trial's TensorBoard scalars."""
    from mlflow import MlflowClient
    from test_lineage import _events

    metric = "val_certified_acc_sigma_0.25_r0"
    # the recipe's 30-epoch schedule with its 2-epoch warm-up, kept as written (set explicitly, so the
    # shortened run does not rescale it): lr 2e-3 learns within 2 epochs, lr 1e-7 does not
    base = _base(f"train.storage_path={tmp_path}", f"tracking.uri={mlflow_server}", "tracking.experiment=sweep-asha",
                 "tracking.register_as=rcm-digits-sweep", "optim.schedule_epochs=30", "optim.warmup_epochs=2",
                 "train.eval_sigmas=0.25", "train.eval_max_n=1000")
    sw = sweep.SweepConfig(space={"optim.lr": "grid:2e-3,1e-7", "method.lbd": "grid:5,10"}, max_concurrent_trials=2,
                           name="asha", alias="sigma-0_25", metric=metric)  # lr 1e-7 learns nothing: ASHA must cut it
    result = sweep.run(base, sw)
    table = result.table
    assert len(table) == 4
    assert (table["status"] == "stopped").sum() >= 1 and (table["status"] == "completed").sum() >= 1
    stopped, completed_rows = table[table["status"] == "stopped"], table[table["status"] == "completed"]
    assert stopped["reports"].max() < completed_rows["reports"].min() == 2  # cut at a rung, before the end
    assert set(table.loc[table["optim.lr"] == 1e-7, "status"]) == {"stopped"}
    assert table.iloc[0]["optim.lr"] == 2e-3 and table.iloc[0][metric] > table.iloc[-1][metric]

    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("sweep-asha")
    runs = client.search_runs([exp.experiment_id])
    parent = next(r for r in runs if r.info.run_id == result.parent_run_id)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 4 and len(runs) == 5
    assert parent.info.status == "FINISHED"
    # stopped early by ASHA: a finished run tagged so, not a red failure beside real ones
    assert {c.info.status for c in children if c.data.tags["rayrcm.sweep_status"] == "stopped"} == {"FINISHED"}
    completed = [c for c in children if c.data.tags["rayrcm.sweep_status"] == "completed"]
    assert all(c.info.status == "FINISHED" for c in completed)
    # the alias points at the version logged by the trial best on the reported metric
    best = max(completed, key=lambda c: c.data.metrics["selected_value"])
    version = client.get_model_version_by_alias("rcm-digits-sweep", "sigma-0_25")
    assert version.run_id == best.info.run_id == parent.data.tags["rayrcm.best_run_id"]
    assert parent.data.metrics[f"best_{metric}"] == pytest.approx(best.data.metrics["selected_value"])
    # a child's metric curve: one value per report
    curve = client.get_metric_history(best.info.run_id, metric)
    assert len(curve) == len({m.step for m in curve}) == 2 and all(0.0 <= m.value <= 1.0 for m in curve)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"sweep_summary.csv", "sweep_summary.md", "metric_vs_params.png"} <= artifacts
    assert parent.data.params["space.optim.lr"] == "grid:2e-3,1e-7"
    # Tune's TensorBoard logs: every trial's own scalars, the certified metric among them
    tags = [_events(f) for f in result.folder.glob("*/") if list(f.glob("events.out.tfevents.*"))]
    assert len(tags) == 4 and all(metric in t for t in tags)
    # the HParams tab opens on the sweep metric: the one metric of each trial's hparams summary
    hp = [_hparam_metrics(f) for f in result.folder.glob("*/") if list(f.glob("events.out.tfevents.*"))]
    assert [m for m in hp if m] and all(m == [metric] for m in hp if m), hp


def _hparam_metrics(folder) -> list[str]:
    """The metrics an HParams experiment summary of a trial folder lists (tensorboardX's protobufs)."""
    import struct

    from tensorboardX.proto import event_pb2, plugin_hparams_pb2

    out: list[str] = []
    for f in folder.glob("events.out.tfevents.*"):
        data, i = f.read_bytes(), 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            ev = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            for v in ev.summary.value:
                if v.tag == "_hparams_/experiment":
                    plugin = plugin_hparams_pb2.HParamsPluginData.FromString(v.metadata.plugin_data.content)
                    out += [m.name.tag for m in plugin.experiment.metric_infos]
    return out


@pytest.mark.slow
def test_interrupted_sweep_resumes_and_runs_each_trial_to_its_end_once(tune_cluster, mlflow_server, tmp_path):
    """The sweep driver is killed (SIGKILL) after a trial has ended; rerunning the same command
    restores the Tune experiment and finishes it: every trial ends exactly once, and trials that
    had ended are never started again."""
    import ray
    from mlflow import MlflowClient

    address = ray.get_runtime_context().gcs_address
    cmd = [sys.executable, str(REPO / "experiments" / "rcm_digits.py"), "tune", "--sigma", "0.25",
           "--space", "method.lbd=grid:5,10", "--set", "train.epochs=2", "--set", "train.workers=1",
           "--set", "train.log_every=100", "--set", f"train.storage_path={tmp_path}", "--set", f"tracking.uri={mlflow_server}",
           "--set", "tracking.experiment=sweep-restore", "--set", "tracking.register_as=rcm-digits-restore",
           "--sweep", "scheduler=fifo", "--sweep", "max_concurrent_trials=1", "--sweep", "name=restore"]
    env = {**os.environ, "RAY_ADDRESS": address}
    folder = tmp_path / "restore"
    first = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not any(e["event"] == "end" for e in sweep.read_events(folder)):
        time.sleep(1)
    assert first.poll() is None, "the sweep ended before it could be interrupted"
    time.sleep(4)  # let the next trial start, so that one is cut mid-run
    first.send_signal(signal.SIGKILL)
    first.wait(30)
    ended_before = {e["trial"] for e in sweep.read_events(folder) if e["event"] == "end"}
    assert len(ended_before) == 1
    time.sleep(5)  # Ray reaps the dead driver's actors

    second = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resuming from" in second.stdout
    events = sweep.read_events(folder)
    trials = {e["trial"] for e in events}
    assert len(trials) == 2
    for trial in trials:
        ends = [e for e in events if e["trial"] == trial and e["event"] == "end"]
        assert len(ends) == 1, (trial, events)
        if trial in ended_before:
            assert len([e for e in events if e["trial"] == trial and e["event"] == "start"]) == 1
    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("sweep-restore")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 3  # the parent (reused on the rerun) and one child per trial
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    for c in children:  # resumed runs log every step once
        hist = client.get_metric_history(c.info.run_id, "loss")
        assert len(hist) == len({m.step for m in hist})



@pytest.mark.slow
def test_a_sweep_whose_every_trial_fails_exits_1_in_one_line(tune_cluster, tmp_path, capsys):
    """The trial diverges (lr 1e30: a non-finite loss within steps): the sweep is a failure, exit 1
    with one line naming where the trials' errors are, not a finished sweep with no best trial."""
    from rayrcm.cli_parse import one_line_errors

    base = _base(f"train.storage_path={tmp_path}", "tracking.enabled=false", "train.epochs=0", "train.steps=20",
                 "optim.warmup_epochs=0", "optim.schedule_epochs=0", "train.checkpoint_epochs=0",
                 "train.max_failures=0")  # no retry: a retry would only meet the same divergence
    sw = sweep.SweepConfig(space={"optim.lr": "grid:1e30"}, max_concurrent_trials=1, name="diverge")
    with pytest.raises(SystemExit) as exit_:
        with one_line_errors():
            sweep.run(base, sw)
    assert exit_.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("rayrcm: error: sweep diverge: no trial completed (1 failed); the trials' errors are in ")


def test_a_certified_metric_adds_its_evaluation_and_a_bad_one_is_one_line():
    base, sw, _ = sweep.validate_sweep(_base(), sweep.SweepConfig(space={"optim.lr": "grid:1e-3,2e-3"},
                                                                  metric="val_certified_acc_sigma_0.25_r0.25"))
    assert "certified" in base.train.evals and base.train.select_metric == sw.metric
    with pytest.raises(ConfigError, match="val_certified_acc_sigma_<s>_r<r>"):
        sweep.validate_sweep(_base(), sweep.SweepConfig(space={"optim.lr": "grid:1e-3,2e-3"},
                                                        metric="val_certified_acc_sigma_0.25_r0.3"))
