#!/usr/bin/env bash
# The GPU benchmark pack on a bare GPU machine (PyTorch, no Ray, no MLflow, no network).
#
# Before (on a machine with a network): build the offline Ray bundle into .whl/ at the repository
# root (git-ignored), and carry .whl/ with the working tree to the GPU machine:
#   benchmarks/offline_ray_bundle.sh .whl       # Ray 2.60 for CPython 3.12, x86-64, ~45 MB
# On the GPU machine, from the repository root:
#   bash benchmarks/gpu_pack.sh [--only engine_vit,engine_resnet] [--out gpu_pack.json]
# It installs the bundle into /tmp/site when `import ray` fails, then runs benchmarks/gpu_pack.py
# (about 8 minutes on one H100: each section has its own time limit). The rows it prints go into
# docs/benchmarks.md, with the device, the torch/CUDA versions and the date it prints.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import ray" 2>/dev/null; then
  if [ -f .whl/ray-trim.zip ]; then
    mkdir -p /tmp/site
    "$PY" -c "import zipfile; zipfile.ZipFile('.whl/ray-trim.zip').extractall('/tmp/site')"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    chmod +x /tmp/site/ray/core/src/ray/raylet/raylet /tmp/site/ray/core/src/ray/gcs/gcs_server
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "[gpu_pack] Ray is not installed and .whl/ray-trim.zip is missing: the Ray sections will fail" >&2
  fi
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
exec "$PY" benchmarks/gpu_pack.py "$@"
