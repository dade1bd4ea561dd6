"""The GPU benchmark pack stays runnable: ``benchmarks/gpu_pack.py --smoke`` runs every section
(engine vs the reference loops, the Ray job against the engine, Ray Train vs one process, the
denoiser, the three sampling modes) on the CPU at tiny sizes, writes its JSON and prints its rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def test_the_pack_runs_every_section_and_prints_its_rows(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "CUDA_VISIBLE_DEVICES")}
    env["HOME"] = str(tmp_path)  # a fresh local Ray cluster of its own
    out = tmp_path / "pack.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_pack.py"), "--smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    pack = json.loads(out.read_text())
    assert pack["smoke"] and {"torch", "cuda", "date", "device"} <= set(pack)
    names = ["engine_vit", "ray_certify", "train_overhead", "denoised", "sampling"]
    assert list(pack["sections"]) == names and all(pack["sections"][n]["rc"] == 0 for n in names)
    s = {n: pack["sections"][n]["summary"] for n in names}
    assert s["engine_vit"]["plain_bf16_s_per_image"] > 0 and s["engine_vit"]["engine_bf16_s_per_image"] > 0
    assert "ray_overhead_steady" in s["ray_certify"] and s["train_overhead"]["ray_images_per_s"] > 0
    assert s["denoised"]["engine_slowdown"] > 1
    assert s["sampling"]["sequential"]["samples"] < s["sampling"]["fixed"]["samples"]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + 7 and all(line.endswith("|") for line in rows)  # the header and one row per figure
