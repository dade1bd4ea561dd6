"""The cluster files checked offline by Ray's own launcher code, and working-dir uploads kept small.
The real cluster path (``ray up`` of ``clusters/onprem.yaml`` on hosts made on this machine, ``ray job
submit``, the MLflow server with basic auth on PostgreSQL, a lost host) is ``test_onprem_cluster.py``."""

from __future__ import annotations

import copy
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import zipfile
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER_FILES = ["cluster.yaml", "clusters/gcp.yaml", "clusters/onprem.yaml"]
BIN = Path(sys.executable).parent


def _prepared(cfg: dict) -> dict:
    """What ``ray up`` does before any cloud call: fill Ray's provider defaults, merge the setup
    commands, then validate against Ray's JSON schema."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    out = prepare_config(copy.deepcopy(cfg))
    validate_config(out)
    return out


def _load(name: str) -> dict:
    return yaml.safe_load((REPO / name).read_text())


def _aws_node_config_errors(node_config: dict) -> str:
    """Check a node_config against EC2 RunInstances' input shape (botocore's model, offline); Ray
    passes it to boto3 as is, apart from the keys it fills itself."""
    import botocore.session
    from botocore.validate import ParamValidator

    op = botocore.session.get_session().get_service_model("ec2").operation_model("RunInstances")
    report = ParamValidator().validate({**node_config, "MinCount": 1, "MaxCount": 1}, op.input_shape)
    return report.generate_report() if report.has_errors() else ""


@pytest.mark.parametrize("name", CLUSTER_FILES)
def test_cluster_file_is_valid_for_ray(name):
    cfg = _prepared(_load(name))
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    if cfg["provider"]["type"] != "local":
        workers = {k: v for k, v in types.items() if k != cfg["head_node_type"]}
        assert types[cfg["head_node_type"]]["resources"]["GPU"] == 0, "the head runs no GPU work"
        assert all(v["resources"]["GPU"] >= 1 and v["max_workers"] >= 1 and v["min_workers"] == 0 for v in workers.values())
        assert sum(v["max_workers"] for v in workers.values()) >= cfg["max_workers"] >= 1
        assert cfg["idle_timeout_minutes"] > 0
    if cfg["provider"]["type"] == "aws":
        for node_type, spec in types.items():
            assert _aws_node_config_errors(spec["node_config"]) == "", node_type
        assert any(v["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot" for v in types.values())


@pytest.mark.parametrize("name", CLUSTER_FILES)
def test_cluster_file_secure_defaults(name):
    """Token auth on every node, the dashboard on the head's loopback only, the token and the
    MLflow credentials shipped as files (never on a command line), MLflow with basic auth, every
    node on the same shared storage path, and the repo's pinned versions installed."""
    cfg = _load(name)
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert cfg["file_mounts"]["~/.mlflow/credentials"] == "~/.mlflow/credentials"
    assert cfg["file_mounts"]["~/rayrcm"] == "." and ".rayignore" in cfg["rsync_filter"]
    head, workers = " ".join(cfg["head_start_ray_commands"]), " ".join(cfg["worker_start_ray_commands"])
    for cmds in (head, workers):
        assert cmds.count("RAY_AUTH_MODE=token") == cmds.count("ray start") == 1
        assert "RAYRCM_STORAGE=/mnt/rayrcm/results" in cmds and "MLFLOW_TRACKING_URI=http://" in cmds
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0:8265" not in head
    setup = " ".join(cfg["setup_commands"])
    assert "-c ~/rayrcm/constraints.txt" in setup and "/mnt/rayrcm" in setup
    assert "password" not in yaml.safe_dump(cfg).lower().replace("mlflow_tracking_password", "")
    # the MLflow server line parses with rayrcm's own CLI and keeps basic auth on
    from rayrcm.cli import _parser

    line = next(c for c in cfg["head_start_ray_commands"] if "rayrcm mlflow-server" in c)
    argv = shlex.split(line[line.index("rayrcm mlflow-server"):].replace("$HOME", "/home/u"))[1:]
    args = _parser().parse_args(argv)
    assert args.command == "mlflow-server" and not args.no_auth and args.detach and args.host == "0.0.0.0"


def test_broken_cluster_files_are_rejected():
    from jsonschema import ValidationError

    typo = _load("cluster.yaml")
    typo["idle_timout_minutes"] = typo.pop("idle_timeout_minutes")
    with pytest.raises(ValidationError, match="idle_timout_minutes"):
        _prepared(typo)
    typo = _load("cluster.yaml")
    typo["available_node_types"]["gpu8"]["min_worker"] = typo["available_node_types"]["gpu8"].pop("min_workers")
    with pytest.raises(ValidationError, match="min_worker"):
        _prepared(typo)
    fractional = _load("clusters/gcp.yaml")
    fractional["available_node_types"]["gpu1_spot"]["resources"]["GPU"] = 0.5
    with pytest.raises(ValidationError, match="integer"):
        _prepared(fractional)
    node_typo = _load("cluster.yaml")["available_node_types"]["gpu8"]["node_config"]
    node_typo["InstanceTyp"] = node_typo.pop("InstanceType")
    assert "Unknown parameter in input: \"InstanceTyp\"" in _aws_node_config_errors(node_typo)


def test_constraints_pin_the_versions_ci_runs():
    pins = dict(re.findall(r"^([\w-]+)==(\S+)", (REPO / "constraints.txt").read_text(), re.M))
    for pkg in ("torch", "torchvision", "ray", "mlflow"):
        assert pins[pkg] == version(pkg), pkg


def test_working_dir_upload_stays_small(tmp_path):
    """Ray's own packaging of ``--working-dir .`` (it reads .gitignore and .rayignore) leaves out
    data, checkpoints, results, virtualenvs and MLflow stores."""
    from ray._private.runtime_env.packaging import _zip_files

    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    if not tracked:
        pytest.skip("not a git checkout")
    src = tmp_path / "repo"
    for rel in tracked + [".rayignore"]:
        if (REPO / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, src / rel)
    junk = ["data/cifar-10-batches-py/data_batch_1", "rayrcm_results/job/checkpoint_000001/model.pt", "mlflow.db",
            ".venv/lib/torch.so", "mlartifacts/1/model.pt", "exported/model.pt", "shards/part-0.parquet", ".git/objects/pack.bin"]
    for rel in junk:
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(os.urandom(1 << 20))
    out = tmp_path / "pkg.zip"
    _zip_files(str(src), [], str(out), include_gitignore=True)
    names = set(zipfile.ZipFile(out).namelist())
    assert "rayrcm/cli.py" in names and "experiments/rcm_digits.py" in names and "constraints.txt" in names
    package = {rel for rel in tracked if rel.startswith("rayrcm/") and rel.endswith(".py")}
    assert package <= names, f"the upload lacks {sorted(package - names)[:5]}"  # e.g. rayrcm/data/
    assert not names & set(junk)
    assert out.stat().st_size < 4 << 20  # the checkout's own text, about 2 MiB stored uncompressed


def test_a_server_started_with_stop_with_ray_stops_after_the_hosts_ray(tmp_path):
    """The watcher of ``rayrcm mlflow-server --detach --stop-with-ray`` waits for Ray to run on the
    host, then stops the server's process group once Ray stops (``ray down``); a server whose host
    never starts Ray is left alone."""
    import threading

    from rayrcm.orchestration import mlflow_server as ms

    names = (f"raylet{os.getpid() % 1000}",)  # a name of Ray's process, unique to this test (this machine may run Rays)
    fake = tmp_path / names[0]
    shutil.copy(shutil.which("sleep"), fake)
    server = subprocess.Popen(["sleep", "300"], start_new_session=True)
    stopped: list[bool] = []
    watcher = threading.Thread(target=lambda: stopped.append(ms.stop_with_ray(server.pid, poll_s=0.1, ray_processes=names)))
    watcher.start()
    time.sleep(0.5)
    assert server.poll() is None  # no Ray yet: the server keeps running
    ray = subprocess.Popen([str(fake), "300"])
    time.sleep(0.5)
    assert server.poll() is None  # Ray runs: still serving
    ray.kill()
    ray.wait()
    watcher.join(10)
    assert stopped == [True] and server.wait(5) is not None

    lone = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        assert ms.stop_with_ray(lone.pid, poll_s=0.05, wait_for_ray_s=0.3, ray_processes=names) is False and lone.poll() is None
    finally:
        lone.kill()
        lone.wait()
