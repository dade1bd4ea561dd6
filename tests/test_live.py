"""Live progress: a bar in a terminal (training drawn by the driver from rank 0's progress file,
certification from the driver's own loop), plain lines in a job log."""

from __future__ import annotations

import fcntl
import io
import json
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import textwrap
import time

import pytest

from rayrcm.orchestration import live
from rayrcm.train.progress import Progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_bar_only_in_a_terminal_and_never_when_lines_are_asked(monkeypatch):
    monkeypatch.delenv(live.PROGRESS_ENV, raising=False)
    monkeypatch.delenv("RAYRCM_VERBOSE", raising=False)
    assert live.interactive(Terminal()) and not live.interactive(io.StringIO())
    monkeypatch.setenv(live.PROGRESS_ENV, "lines")
    assert not live.interactive(Terminal())
    monkeypatch.setenv(live.PROGRESS_ENV, "auto")
    monkeypatch.setenv("RAYRCM_VERBOSE", "1")  # Ray's own lines would tear the bar
    assert not live.interactive(Terminal())


def test_with_a_sink_rank_0_hands_over_its_state_instead_of_printing():
    said, states = [], []
    p = Progress("job", 100, 10, 0.0, said.append, sink=states.append)
    p.validated({"val_acc_clean": 0.875})
    p(40, {"loss": 0.5, "images_per_s": 1234.0})
    assert said == []
    state = json.loads(states[-1])
    assert (state["step"], state["total"], state["start"]) == (40, 100, 10)
    assert state["postfix"] == "loss 0.5, val_acc_clean 0.875, 1,234 img/s"
    plain = Progress("job", 100, 10, 0.0, said.append)
    plain.validated({"val_acc_clean": 0.875})
    plain(40, {"loss": 0.5, "images_per_s": 1234.0})
    assert said[0].startswith("[rayrcm] job: step 40/100 (40%) loss 0.5, val_acc_clean 0.875, 1,234 img/s")


def test_the_driver_draws_the_bar_from_the_progress_file(tmp_path):
    f = tmp_path / live.PROGRESS_FILE
    out = Terminal()
    follow = live.FollowProgress(f, "job", 50, every_s=0.01, stream=out)
    follow.start()
    time.sleep(0.05)  # no file yet: nothing drawn, nothing raised
    assert follow.bar is None
    for step in (10, 30, 50):
        f.write_text(json.dumps({"step": step, "total": 50, "start": 0, "postfix": f"loss {1 / step:.3g}"}))
        time.sleep(0.1)
    follow.close()
    text = out.getvalue()
    assert "[rayrcm] job" in text and "50/50" in text and "100%" in text and "loss 0.02" in text
    assert "\r" in text  # redrawn in place


SCRIPT = textwrap.dedent("""
    import sys
    from rayrcm.orchestration import console
    console.configure()
    from rayrcm.config import apply_overrides, ExperimentConfig
    from rayrcm.orchestration.trainer import fit
    from rayrcm.orchestration import certify_job
    out = sys.argv[1]
    cfg = apply_overrides(ExperimentConfig(), [
        "data.name=digits", "data.image_size=8", "data.batch_size=64", "model.encoder=cifar_resnet8",
        "method.name=gaussian", "method.sigma=0.25", "optim.name=sgd", "optim.lr=0.05", "train.steps=12",
        "train.workers=1", "train.log_every=2", "train.checkpoint_every=100", "train.name=live",
        f"train.storage_path={out}", "tracking.enabled=false"])
    model = fit(cfg).model_file
    certify_job.run(certify_job.config_from_args([
        f"model={model}", f"out_dir={out}/certify", "name=live", "tracking.enabled=false", "smoothing.n0=100",
        "smoothing.n=200", "smoothing.skip=60", "compute.batch=100", "compute.progress_every_s=0"]))
""")


def _run_in_terminal(argv: list[str], env: dict[str, str], timeout: float) -> str:
    """Run ``argv`` with a pseudo-terminal as stdout and stderr; everything it wrote."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # 40 rows, 120 columns
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=env, close_fds=True)
    os.close(slave)
    chunks, deadline = [], time.time() + timeout
    while time.time() < deadline:
        ready, _, _ = select.select([master], [], [], 1.0)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    proc.wait(timeout=30)
    os.close(master)
    text = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0, text[-3000:]
    return text


@pytest.mark.slow
def test_a_terminal_gets_live_bars_for_training_and_certification(tmp_path):
    env = {**os.environ, "HOME": str(tmp_path / "home")}  # Ray's token goes to this HOME
    for key in ("RAY_ADDRESS", live.PROGRESS_ENV, "RAYRCM_VERBOSE", "MLFLOW_TRACKING_URI"):
        env.pop(key, None)
    (tmp_path / "home").mkdir()
    text = _run_in_terminal([sys.executable, "-c", SCRIPT, str(tmp_path / "out")], env, timeout=400)
    assert "[rayrcm] live: 100%" in text and "12/12" in text and "\r" in text, text[-3000:]
    assert "[rayrcm] live: step " not in text, "no plain progress lines beside the bar"
    assert "[rayrcm] live: done in" in text  # the summary still prints
    assert "[rayrcm] certify live: 100%" in text and "6/6" in text and "samples/s" in text, text[-3000:]
    assert "[rayrcm] certify: 6/6 images" not in text


def test_sweep_bar_state_counts_every_trials_steps(tmp_path):
    from rayrcm.orchestration import sweep

    folder, storage = tmp_path / "sw", tmp_path
    folder.mkdir()
    events = [{"trial": "a", "event": "start", "job": "sw-a"}, {"trial": "b", "event": "start", "job": "sw-b"},
              {"trial": "c", "event": "start", "job": "sw-c"},
              {"trial": "a", "event": "end", "job": "sw-a", "metrics": {"val_acc": 0.8, "step": 10}}]
    (folder / sweep.TRIALS_LOG).write_text("".join(json.dumps(e) + "\n" for e in events))
    (tmp_path / "sw-b").mkdir()
    (tmp_path / "sw-b" / live.PROGRESS_FILE).write_text(json.dumps({"step": 4, "total": 10, "start": 0, "postfix": ""}))
    state = sweep.sweep_state(folder, str(storage), 4, 10, "val_acc", "max")  # sw-c: started, no file yet
    assert state["step"] == 10 + 4 + 0 and state["total"] == 40
    assert state["postfix"] == "trials 1/4 done, 2 running, best val_acc 0.8"
    # once the sweep has ended, a started trial without an end was stopped early (or failed): not "running"
    final = sweep.sweep_state(folder, str(storage), 4, 10, "val_acc", "max", final=True)
    assert final["postfix"] == "1 trials completed, 2 stopped early or failed, best val_acc 0.8"


SWEEP_SCRIPT = textwrap.dedent("""
    import sys
    from rayrcm.orchestration import console
    console.configure()
    from rayrcm.config import apply_overrides, ExperimentConfig
    from rayrcm.orchestration import sweep
    cfg = apply_overrides(ExperimentConfig(), [
        "data.name=digits", "data.image_size=8", "data.batch_size=64", "model.encoder=cifar_resnet8",
        "method.name=gaussian", "method.sigma=0.25", "optim.name=sgd", "optim.lr=0.05", "train.steps=6",
        "train.workers=1", "train.log_every=2", "train.checkpoint_every=3", "train.name=livesweep",
        f"train.storage_path={sys.argv[1]}", "tracking.enabled=false"])
    sweep.run(cfg, sweep.SweepConfig(space={"optim.lr": "grid:0.05,0.01"}, name="livesweep", votes=2,
                                     max_concurrent_trials=1))
""")


@pytest.mark.slow
def test_a_terminal_gets_one_live_bar_for_a_sweep(tmp_path):
    env = {**os.environ, "HOME": str(tmp_path / "home")}
    for key in ("RAY_ADDRESS", live.PROGRESS_ENV, "RAYRCM_VERBOSE", "MLFLOW_TRACKING_URI"):
        env.pop(key, None)
    (tmp_path / "home").mkdir()
    text = _run_in_terminal([sys.executable, "-c", SWEEP_SCRIPT, str(tmp_path / "out")], env, timeout=500)
    assert "[rayrcm] sweep livesweep: 100%" in text and "12/12" in text, text[-3000:]
    assert "trials 2/2 done" in text, text[-3000:]
    assert " step " not in text and "done in" not in text, "no trial lines beside the sweep's bar"
    assert "[rayrcm] best trial" in text  # rayrcm's own table and summary still print
