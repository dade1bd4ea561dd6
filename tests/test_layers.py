"""The pure PyTorch layer never imports Ray or MLflow."""

from __future__ import annotations

import subprocess
import sys

PURE = ["rayrcm.config", "rayrcm.data", "rayrcm.models", "rayrcm.objectives", "rayrcm.train.loop",
        "rayrcm.train.optim", "rayrcm.train.checkpoint", "rayrcm.eval.accuracy", "rayrcm.quickstart",
        "rayrcm.certify", "rayrcm.analysis", "rayrcm.attacks", "rayrcm.eval.robust", "rayrcm.objectives.rcs", "rayrcm.objectives.rcs_schedule",
        "rayrcm.eval", "rayrcm.models.export", "rayrcm.train.session", "rayrcm.train.selection", "rayrcm.train.progress",
        "rayrcm.sections", "rayrcm.overrides", "rayrcm.plugins", "rayrcm.distributed"]


def test_pure_modules_do_not_load_ray_or_mlflow():
    code = ("import importlib, sys\n"
            f"for m in {PURE!r}: importlib.import_module(m)\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'mlflow'))\n"
            "print(','.join(bad))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"pure modules loaded: {out}"
