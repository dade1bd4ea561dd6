#!/usr/bin/env bash
# Build a bundle that installs Ray (train, tune, data) on an offline x86-64 CUDA host
# running CPython 3.12 that already has torch, numpy, pandas, pyarrow and fsspec.
#
#   benchmarks/offline_ray_bundle.sh [OUT_DIR]        (default: .whl; run from the repository root)
#
# On the host, from the same folder:
#   mkdir -p /tmp/site && python3 -c "import zipfile; zipfile.ZipFile('.whl/ray-trim.zip').extractall('/tmp/site')"
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
#   chmod +x /tmp/site/ray/core/src/ray/raylet/raylet /tmp/site/ray/core/src/ray/gcs/gcs_server
#   export PYTHONPATH=/tmp/site:$PWD
#
# The Ray wheel is ~80 MB; the Java jar, RLlib, Serve, LLM and the dashboard's
# web build are dropped so the bundle stays near 45 MB.
set -euo pipefail
OUT=${1:-.whl}
RAY_VERSION=${RAY_VERSION:-2.60.0}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
tmp=$(mktemp -d)
plat=(--only-binary=:all: --python-version 3.12 --implementation cp
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
"$PY" -m pip download -q --no-deps "${plat[@]}" -d "$tmp" "ray==$RAY_VERSION"
"$PY" -m pip download -q --no-deps "${plat[@]}" -d "$OUT" \
  jsonschema jsonschema-specifications referencing rpds-py tensorboardX \
  pydantic pydantic-core annotated-types typing-inspection
"$PY" - "$tmp" "$OUT" <<'PYEOF'
import glob, sys, zipfile
src = zipfile.ZipFile(glob.glob(f"{sys.argv[1]}/ray-*.whl")[0])
skip = ("ray/jars/", "ray/rllib/", "ray/serve/", "ray/llm/", "ray/dashboard/client/build/")
with zipfile.ZipFile(f"{sys.argv[2]}/ray-trim.zip", "w", zipfile.ZIP_DEFLATED, compresslevel=9) as dst:
    for info in src.infolist():
        if not info.filename.startswith(skip):
            dst.writestr(info, src.read(info.filename))
PYEOF
rm -rf "$tmp"
du -sh "$OUT"
