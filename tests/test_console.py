"""The console: rayrcm's own lines only by default (a progress line at a steady cadence with ETA,
a summary), Ray's own logs with ``--verbose``. Each run is a fresh ``rayrcm train`` process with a
local Ray cluster and an MLflow sqlite store, as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from rayrcm.train.progress import Progress, duration

RECIPE = """\
data: {image_size: 8, batch_size: 32}
model: {patch_size: 4}
method: {name: gaussian, sigma: 0.25}
train: {steps: 8, workers: 2, checkpoint_every: 4, log_every: 2, eval_sigmas: [0.25], name: console}
tracking: {experiment: console}
"""


def test_progress_line_has_a_steady_cadence_and_an_eta():
    now = [0.0]
    lines: list[str] = []
    p = Progress("job", total=100, start=0, every_s=10, say=lines.append, clock=lambda: now[0])
    for step in range(10, 101, 10):
        now[0] += 4  # a logged step every 4 s: a line at most every 10 s, the first and the last always
        if step == 50:
            p.validated({"val_acc_sigma_0.25": 0.8125, "val_images": 64.0})
        p(step, {"loss": 1.0, "lr": 1e-3, "images_per_s": 250.0})
    assert [line.split("step ")[1].split("/")[0] for line in lines] == ["10", "40", "70", "100"]
    assert lines[0] == "[rayrcm] job: step 10/100 (10%) loss 1, lr 0.001, 250 img/s, ETA 36s"
    assert lines[2] == "[rayrcm] job: step 70/100 (70%) loss 1, lr 0.001, val_acc_sigma_0.25 0.8125, 250 img/s, ETA 12s"
    assert lines[-1].endswith("done") and duration(3725) == "1h02m" and duration(75) == "1m15s"


def _train(tmp: Path, *flags: str) -> subprocess.Popen:
    """A ``rayrcm train`` process of its own (its own HOME, Ray temp dir and local cluster)."""
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "r.yaml").write_text(RECIPE)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "RAYRCM_", "MLFLOW_"))}
    env.update(HOME=str(tmp / "home"), RAY_TMPDIR=tempfile.mkdtemp(prefix="rc", dir="/tmp"),
               RAYRCM_STORAGE=str(tmp / "results"))
    return subprocess.Popen([sys.executable, "-m", "rayrcm.cli", "train", "r.yaml", *flags], cwd=tmp, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _lines(proc: subprocess.Popen) -> list[str]:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return (out + err).splitlines()


@pytest.mark.slow
def test_quiet_by_default_and_everything_with_verbose(tmp_path):
    runs = _train(tmp_path / "quiet"), _train(tmp_path / "verbose", "--verbose")  # side by side: mostly waiting
    quiet, verbose = _lines(runs[0]), _lines(runs[1])
    assert quiet and all(line.startswith("[rayrcm]") for line in quiet), "\n".join(quiet)
    assert any("console: step 8/8" in line for line in quiet) and any("done in" in line for line in quiet)
    assert len(quiet) <= 12
    assert len(verbose) > len(quiet) and any(not line.startswith("[rayrcm]") for line in verbose)
    assert any("RayTrainWorker" in line or "TrainController" in line for line in verbose)
