"""Every recipe's ``--help``, and every stage's, answers without importing torch, Ray or MLflow (it
took 5-8 s when the config layer imported the registries' torch modules at load time)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p.relative_to(ROOT).as_posix() for d in ("experiments", "examples") for p in (ROOT / d).glob("[!_]*.py"))

PROBE = r"""
import contextlib, io, json, re, runpy, sys
path = sys.argv[1]
sys.path.insert(0, path.rsplit("/", 1)[0])

def help_of(args):
    sys.argv = [path, *args]
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        try:
            runpy.run_path(path, run_name="__main__")
        except SystemExit as exit_:
            assert exit_.code in (0, None), (args, exit_.code)
    return out.getvalue()

top = help_of(["--help"])
choices = re.findall(r"\{([a-z0-9_,-]+)\}", top.split("\n\n", 1)[0])  # the usage block's last {...}: the stage
stages = choices[-1].split(",") if choices else []
texts = {stage: help_of([stage, "--help"]) for stage in stages}
print(json.dumps({"stages": stages, "empty": [s for s, t in texts.items() if "usage:" not in t],
                  "heavy": sorted(m for m in ("torch", "ray", "mlflow") if m in sys.modules)}))
"""


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_and_stage_help_load_neither_torch_ray_nor_mlflow(recipe):
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", PROBE, recipe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    wall = time.perf_counter() - t
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["heavy"] == [], (recipe, got)
    assert got["empty"] == [], (recipe, got)  # every stage printed its own usage
    assert wall < 10, wall  # generous for a loaded CI machine; the module check above is the exact one


def test_the_seed_grid_constant_is_the_schedule_it_names():
    sys.path.insert(0, str(ROOT / "experiments"))
    try:
        import _rcm_seed
    finally:
        sys.path.pop(0)
    from rayrcm.objectives.rcm import num_levels

    assert _rcm_seed.FINETUNE_GRID_LEVELS == num_levels(300_000, 600_000, 20, 80)
