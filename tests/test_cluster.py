"""The cluster path: cluster files checked offline by Ray's own launcher code, working-dir uploads
kept small, and recipe stages submitted with ``ray job submit`` to a real 2-node cluster started
with ``ray start`` (token auth on) that logs to a real MLflow server with basic auth."""

from __future__ import annotations

import copy
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
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
    argv = shlex.split(line.split("&&", 1)[1].replace("$HOME", "/home/u"))[1:]
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
    assert not names & set(junk)
    assert out.stat().st_size < 2 << 20


# --- a real cluster: ray start (head + worker node), token auth, ray job submit -----------------

def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], env: dict[str, str], timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if check and proc.returncode:
        raise AssertionError(f"{' '.join(cmd)} -> {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def job_cluster(tmp_path_factory):
    """``ray start --head`` and a second ``ray start --address`` node on loopback, with their own
    HOME (token at ~/.ray/auth_token, MLflow credentials at ~/.mlflow/credentials) and temp dir,
    plus ``rayrcm mlflow-server --detach`` with basic auth, as the cluster files start them."""
    import ray

    ray.shutdown()  # no in-process cluster of an earlier test module may linger
    root = tmp_path_factory.mktemp("cluster")
    home = root / "home"
    (home / ".mlflow").mkdir(parents=True)
    creds = ("rayrcm-ci", "a-long-test-password-1")
    (home / ".mlflow" / "credentials").write_text(f"[mlflow]\nmlflow_tracking_username = {creds[0]}\n"
                                                  f"mlflow_tracking_password = {creds[1]}\n")
    temp = Path(os.path.realpath(os.environ.get("TMPDIR", "/tmp"))) / f"rj{os.getpid()}"
    storage = root / "shared"
    mlflow_port, gcs_port, dash_port = _free_port(), _free_port(), _free_port()
    tracking = f"http://127.0.0.1:{mlflow_port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    env.update(HOME=str(home), PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", RAY_AUTH_MODE="token",
               PYTHONUNBUFFERED="1")
    _run([str(BIN / "ray"), "get-auth-token", "--generate"], env)
    # --host 0.0.0.0 as the cluster files start it on a head (with auth), answered on loopback
    server = _run([str(BIN / "rayrcm"), "mlflow-server", "--host", "0.0.0.0", "--port", str(mlflow_port),
                   "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                   "--artifacts-destination", str(root / "artifacts"), "--detach", "--pidfile", str(root / "mlflow.pid")],
                  env, timeout=180)
    assert "basic auth" in server.stdout
    node_env = {**env, "RAYRCM_STORAGE": str(storage), "MLFLOW_TRACKING_URI": tracking}
    try:
        _run([str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs_port}",
              "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}", f"--ray-client-server-port={_free_port()}",
              "--num-cpus=2", f"--temp-dir={temp}", "--disable-usage-stats"], node_env)
        # its own temp dir, as a separate machine would have: nodes sharing one would share (and
        # garbage-collect) each other's unpacked working dirs
        _run([str(BIN / "ray"), "start", f"--address=127.0.0.1:{gcs_port}", "--node-ip-address=127.0.0.1",
              "--num-cpus=2", f"--temp-dir={temp}n"], node_env)
        yield {"env": env, "address": f"http://127.0.0.1:{dash_port}", "tracking": tracking, "storage": storage,
               "home": home, "creds": creds}
    finally:
        _run([str(BIN / "ray"), "stop"], env, check=False)
        pid = (root / "mlflow.pid").read_text().strip() if (root / "mlflow.pid").exists() else ""
        if pid:
            try:
                os.killpg(int(pid), 15)
            except ProcessLookupError:
                pass
        shutil.rmtree(temp, ignore_errors=True)
        shutil.rmtree(f"{temp}n", ignore_errors=True)


def _submit(c: dict, *entrypoint: str) -> str:
    """Submit; a loaded machine may start the head's job agent after the dashboard answers, and Ray
    then asks the client to try again later, which is what a user would do."""
    sub_id = f"rayrcm-test-{int(time.time() * 1000)}"
    cmd = [str(BIN / "ray"), "job", "submit", "--address", c["address"], "--working-dir", ".", "--submission-id", sub_id,
           "--no-wait", "--", *entrypoint]
    for _ in range(12):
        proc = _run(cmd, c["env"], check=False)
        if proc.returncode == 0 or "No available agent" not in proc.stdout + proc.stderr:
            break
        time.sleep(5)
    if proc.returncode:
        raise AssertionError(f"{' '.join(cmd)} -> {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return sub_id


def _wait(c: dict, sub_id: str, timeout: float = 300) -> tuple[str, str]:
    deadline = time.time() + timeout
    status = ""
    while time.time() < deadline:
        out = _run([str(BIN / "ray"), "job", "status", "--address", c["address"], sub_id], c["env"]).stdout
        # "Status for job 'x': RUNNING" while it runs, "Job 'x' succeeded" (failed, stopped) at the end
        m = re.search(r"Status for job '[^']+': (\w+)|Job '[^']+' (succeeded|failed|stopped)", out)
        status = (m.group(1) or m.group(2).upper()) if m else status
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(3)
    logs = _run([str(BIN / "ray"), "job", "logs", "--address", c["address"], sub_id], c["env"]).stdout
    return status, logs


TINY = ["--set", "train.epochs=0", "--set", "train.steps=6", "--set", "train.checkpoint_epochs=0",
        "--set", "train.checkpoint_every=3", "--set", "optim.warmup_epochs=0", "--set", "optim.schedule_epochs=0",
        "--set", "data.batch_size=32", "--set", "train.workers=2", "--set", "train.log_every=3"]


@pytest.mark.slow
def test_recipe_stages_as_ray_jobs(job_cluster):
    """finetune then certify, each a ``ray job submit --working-dir .`` of the digits recipe: the
    job drivers find the MLflow server and the shared storage through the environment the nodes
    were started with, authenticate to MLflow with the credentials file, and the second job finds
    the first one's model through the registry alias."""
    import mlflow
    from mlflow import MlflowClient

    c = job_cluster
    ft = _submit(c, "python", "experiments/rcm_digits.py", "finetune", "--sigma", "0.25", *TINY,
                 "--set", "train.name=cluster-finetune")
    status, logs = _wait(c, ft)
    assert status == "SUCCEEDED", logs[-4000:]
    assert "finetune done: run" in logs
    assert (c["storage"] / "cluster-finetune" / "model.pt").is_file()

    cert = _submit(c, "python", "experiments/rcm_digits.py", "certify", "--sigma", "0.25", "--set", "smoothing.n0=20",
                   "--set", "smoothing.n=100", "--set", "smoothing.chunk=100", "--set", "smoothing.max=8",
                   "--set", "name=cluster-certify")
    status, logs = _wait(c, cert)
    assert status == "SUCCEEDED", logs[-4000:]
    tsv = c["storage"] / "certify" / "cluster-certify" / "results.tsv"
    assert tsv.is_file() and len(tsv.read_text().splitlines()) == 1 + 2  # images 0 and 4 (skip 4, max 8)

    # without credentials the server refuses; with them the runs are there, nested
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(c["tracking"] + "/api/2.0/mlflow/experiments/search?max_results=5", timeout=10)
    assert err.value.code == 401
    os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = c["creds"]
    try:
        client = MlflowClient(c["tracking"])
        exp = client.get_experiment_by_name("rayrcm-digits")
        runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
        finetune_run = runs["cluster-finetune"]
        assert finetune_run.info.status == "FINISHED" and finetune_run.data.metrics["loss"] > 0
        version_ = client.get_model_version_by_alias("rcm-digits", "sigma-0_25")
        assert version_.run_id == finetune_run.info.run_id
        certify_run = next(r for r in runs.values() if r.data.tags.get("mlflow.parentRunId") == finetune_run.info.run_id)
        assert certify_run.info.status == "FINISHED" and "certified_acc_0.00" in certify_run.data.metrics
    finally:
        os.environ.pop("MLFLOW_TRACKING_USERNAME")
        os.environ.pop("MLFLOW_TRACKING_PASSWORD")
        mlflow.set_tracking_uri(None)


@pytest.mark.slow
def test_failing_job_reports_failed_with_one_line_error(job_cluster):
    c = job_cluster
    sub = _submit(c, "python", "experiments/rcm_digits.py", "finetune", "--set", "optim.lr=-1")
    status, logs = _wait(c, sub, timeout=180)
    assert status == "FAILED"
    errors = [line for line in logs.splitlines() if line.startswith("rayrcm: error:")]
    assert errors == ["rayrcm: error: optim.lr=-1.0 is invalid: must be > 0"], logs[-2000:]
    assert "Traceback" not in logs


@pytest.mark.slow
def test_cluster_refuses_a_wrong_token(job_cluster):
    c = job_cluster
    proc = _run([str(BIN / "ray"), "job", "list", "--address", c["address"]], {**c["env"], "RAY_AUTH_TOKEN": "0" * 32},
                check=False)
    assert proc.returncode != 0 and "token is invalid" in (proc.stdout + proc.stderr)
