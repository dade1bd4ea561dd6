"""``ray up`` of ``clusters/onprem.yaml`` against real hosts made on this machine, then the user's
client path: ``ray dashboard`` (the SSH tunnel to the job API), ``ray job submit`` of recipe stages,
the MLflow server's runs in PostgreSQL, a worker host lost in the middle of training, ``ray down``.

The hosts (:mod:`netns_hosts`) are network namespaces on a private bridge, each with its own
processes, home, ``/tmp`` and sshd. The cluster file is the user's, with only what the user edits
replaced: the addresses, the SSH user and key, the database server, and a local folder standing in
for the NFS export (``mount --bind`` instead of ``mount -t nfs``). Every setup and start command
runs as written, so a broken one fails this test. About six minutes on 2 CPUs.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import netns_hosts
import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CREDS = ("rayrcm-ci", "a-long-test-password-1")


def user_file(hosts: netns_hosts.Hosts) -> str:
    """``clusters/onprem.yaml`` with the values a user edits (marked EDIT) set to the test's hosts."""
    text = (REPO / "clusters" / "onprem.yaml").read_text()
    pg = hosts.pg
    edits = [
        ("head_ip: 10.0.0.10", f"head_ip: {hosts.hosts[0].ip}"),
        ("worker_ips: [10.0.0.11, 10.0.0.12]", f"worker_ips: [{', '.join(h.ip for h in hosts.hosts[1:])}]"),
        ("max_workers: 2", f"max_workers: {len(hosts.hosts) - 1}"),
        ("ssh_user: rayrcm ", "ssh_user: root   "),
        ("ssh_private_key: ~/.ssh/id_ed25519", f"ssh_private_key: {hosts.key}"),
        ("sudo mount -t nfs -o hard,timeo=600\n    nfs.example.internal:/export/rayrcm /mnt/rayrcm",
         f"sudo mount --bind {hosts.shared} /mnt/rayrcm"),
        ("postgresql://rayrcm@db.example.internal:5432/mlflow",
         f"postgresql://{pg['user']}@{pg['host']}:{pg['port']}/{pg['db']}"),
    ]
    for old, new in edits:
        assert old in text, f"clusters/onprem.yaml no longer has {old!r}: update this test's edits"
        text = text.replace(old, new)
    return text


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], env: dict[str, str], timeout: float = 180, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if check and proc.returncode:
        raise AssertionError(f"{' '.join(cmd)} -> {proc.returncode}\n{proc.stdout[-5000:]}\n{proc.stderr[-3000:]}")
    return proc


def _nodes_alive(c: dict) -> int:
    out = _run([str(BIN / "ray"), "exec", str(c["file"]), "ray status"], c["env"], check=False).stdout
    active = out.split("Active:")[1].split("Pending:")[0] if "Active:" in out and "Pending:" in out else ""
    return sum(int(n) for n in re.findall(r"^\s*(\d+) \S+", active, re.M))  # " 2 local.cluster.node"


@pytest.fixture(scope="module")
def onprem():
    """The hosts, PostgreSQL, the user's files on the client (Ray token, MLflow credentials), ``ray up``,
    the worker joined, and ``ray dashboard``'s tunnel; ``ray down`` and every host removed at the end."""
    reason = netns_hosts.why_not()
    if reason:
        pytest.skip(f"hosts cannot be made on this machine ({reason}); the cluster path is not tested here")
    netns_hosts.install_missing()
    import ray

    ray.shutdown()
    base = Path(tempfile.mkdtemp(prefix="rayrcm-hosts-", dir="/var/tmp"))  # outside /tmp: each host has its own
    base.chmod(0o755)
    hosts = netns_hosts.Hosts(base, 2)
    client = base / "client"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    env.update(HOME=str(client), PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", RAY_AUTH_MODE="token",
               RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    state = Path("/tmp/cluster-rayrcm.state")  # the local provider's record of the hosts, on the client
    kept = state.read_bytes() if state.exists() else None  # a real cluster's record of the same name
    cluster_file, tunnel = base / "onprem.yaml", None
    try:
        hosts.up()
        password = hosts.postgres()
        pgpass = hosts.hosts[0].root / "home" / "root" / ".pgpass"  # the database password, on the head only
        pg = hosts.pg
        pgpass.write_text(f"{pg['host']}:{pg['port']}:{pg['db']}:{pg['user']}:{password}\n")
        pgpass.chmod(0o600)
        (client / ".mlflow").mkdir(parents=True)
        (client / ".mlflow" / "credentials").write_text(
            f"[mlflow]\nmlflow_tracking_username = {CREDS[0]}\nmlflow_tracking_password = {CREDS[1]}\n")
        (client / ".mlflow" / "credentials").chmod(0o600)
        _run([str(BIN / "ray"), "get-auth-token", "--generate"], env)
        cluster_file.write_text(user_file(hosts))
        _run([str(BIN / "ray"), "up", "-y", "--no-config-cache", str(cluster_file)], env, timeout=900)
        c = {"hosts": hosts, "env": env, "file": cluster_file, "shared": hosts.shared,
             "tracking": f"http://{hosts.hosts[0].ip}:5000"}
        deadline = time.time() + 600  # the head's autoscaler sets up and starts the worker host
        while _nodes_alive(c) < 2:
            assert time.time() < deadline, "the worker host never joined"
            time.sleep(5)
        port = _free_port()
        tunnel = subprocess.Popen([str(BIN / "ray"), "dashboard", "-p", str(port), str(cluster_file)], env=env,
                                  cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        c["address"] = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while _run([str(BIN / "ray"), "job", "list", "--address", c["address"]], env, check=False).returncode:
            assert time.time() < deadline, "the job API never answered through the tunnel"
            time.sleep(2)
        yield c
    finally:
        if tunnel is not None:
            tunnel.terminate()
            tunnel.wait(30)
        if cluster_file.exists():
            _run([str(BIN / "ray"), "down", "-y", str(cluster_file)], env, timeout=300, check=False)
        hosts.close()
        if kept is None:
            state.unlink(missing_ok=True)
        else:
            state.write_bytes(kept)
        left = hosts.leftovers()
        import shutil

        shutil.rmtree(base, ignore_errors=True)
        assert not left, f"left behind: {left}"


def _submit(c: dict, *entrypoint: str) -> str:
    sub_id = f"rayrcm-onprem-{int(time.time() * 1000)}"
    cmd = [str(BIN / "ray"), "job", "submit", "--address", c["address"], "--working-dir", ".", "--submission-id",
           sub_id, "--no-wait", "--", *entrypoint]
    for _ in range(12):  # a job agent that is not up yet asks the client to try again
        proc = _run(cmd, c["env"], check=False)
        if proc.returncode == 0 or "No available agent" not in proc.stdout + proc.stderr:
            break
        time.sleep(5)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return sub_id


def _status(c: dict, sub_id: str) -> str:
    out = _run([str(BIN / "ray"), "job", "status", "--address", c["address"], sub_id], c["env"]).stdout
    m = re.search(r"Status for job '[^']+': (\w+)|Job '[^']+' (succeeded|failed|stopped)", out)
    return (m.group(1) or m.group(2).upper()) if m else ""


def _wait(c: dict, sub_id: str, timeout: float = 420) -> tuple[str, str]:
    deadline, status = time.time() + timeout, ""
    while time.time() < deadline and status not in ("SUCCEEDED", "FAILED", "STOPPED"):
        time.sleep(3)
        status = _status(c, sub_id)
    logs = _run([str(BIN / "ray"), "job", "logs", "--address", c["address"], sub_id], c["env"]).stdout
    return status, logs


TINY = ["--set", "train.epochs=0", "--set", "train.checkpoint_epochs=0", "--set", "optim.warmup_epochs=0",
        "--set", "optim.schedule_epochs=0", "--set", "data.batch_size=32", "--set", "train.workers=2",
        "--set", "train.placement=SPREAD", "--set", "train.log_every=3"]


def _client(c: dict):
    from mlflow import MlflowClient

    os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = CREDS
    return MlflowClient(c["tracking"])


@pytest.fixture
def creds():
    yield
    import mlflow

    os.environ.pop("MLFLOW_TRACKING_USERNAME", None)
    os.environ.pop("MLFLOW_TRACKING_PASSWORD", None)
    mlflow.set_tracking_uri(None)


def test_stages_run_on_both_hosts_log_to_postgres_and_load_back_by_alias(onprem, creds):
    """The digits fine-tuning with two workers, one on each host, then its certification as a second
    job: checkpoints and results on the shared export, both runs on the head's MLflow server (basic
    auth, runs in PostgreSQL), the model registered and loaded back by alias on the client."""
    c = onprem
    ft = _submit(c, "python", "experiments/rcm_digits.py", "finetune", "--sigma", "0.25", *TINY,
                 "--set", "train.steps=6", "--set", "train.checkpoint_every=3", "--set", "train.name=onprem-finetune")
    status, logs = _wait(c, ft)
    assert status == "SUCCEEDED", logs[-4000:]
    assert "2 worker(s) on 2 node(s)" in logs and "finetune done: run" in logs, logs[-3000:]
    assert (c["shared"] / "results" / "onprem-finetune" / "model.pt").is_file()

    cert = _submit(c, "python", "experiments/rcm_digits.py", "certify", "--sigma", "0.25", "--set", "smoothing.n0=20",
                   "--set", "smoothing.n=100", "--set", "smoothing.chunk=100", "--set", "smoothing.max=8",
                   "--set", "name=onprem-certify")
    status, logs = _wait(c, cert)
    assert status == "SUCCEEDED", logs[-4000:]
    tsv = c["shared"] / "results" / "certify" / "onprem-certify" / "results.tsv"
    assert tsv.is_file() and len(tsv.read_text().splitlines()) == 1 + 2  # images 0 and 4 (skip 4, max 8)

    with pytest.raises(urllib.error.HTTPError) as err:  # no credentials: refused
        urllib.request.urlopen(c["tracking"] + "/api/2.0/mlflow/experiments/search?max_results=5", timeout=10)
    assert err.value.code == 401
    client = _client(c)
    exp = client.get_experiment_by_name("rayrcm-digits")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    finetune_run = runs["onprem-finetune"]
    assert finetune_run.info.status == "FINISHED" and finetune_run.data.metrics["loss"] > 0
    assert client.get_model_version_by_alias("rcm-digits", "sigma-0_25").run_id == finetune_run.info.run_id
    certify_run = next(r for r in runs.values() if r.data.tags.get("mlflow.parentRunId") == finetune_run.info.run_id)
    assert certify_run.info.status == "FINISHED" and "certified_acc_0.00" in certify_run.data.metrics

    from rayrcm import api

    model, meta = api.load_model("models:/rcm-digits@sigma-0_25", c["tracking"])
    assert meta["config"]["train"]["name"] == "onprem-finetune" and sum(p.numel() for p in model.parameters()) > 0
    pg = c["hosts"].pg  # the runs are rows of the team's database, not of a file on the head
    rows = subprocess.run(["runuser", "-u", "postgres", "--", str(pg["bindir"] / "psql"), "-h",
                           str(c["hosts"].base / "pg" / "sock"), "-p", str(pg["port"]), "-U", "postgres", "-d", pg["db"],
                           "-tAc", f"SELECT count(*) FROM runs WHERE run_uuid = '{finetune_run.info.run_id}'"],
                          capture_output=True, text=True, timeout=30)
    assert rows.stdout.strip() == "1", rows.stderr


def test_a_bad_config_fails_its_job_in_one_line_and_a_wrong_token_is_refused(onprem):
    c = onprem
    sub = _submit(c, "python", "experiments/rcm_digits.py", "finetune", "--set", "optim.lr=-1")
    status, logs = _wait(c, sub, timeout=180)
    assert status == "FAILED"
    errors = [line for line in logs.splitlines() if line.startswith("rayrcm: error:")]
    assert errors == ["rayrcm: error: optim.lr=-1.0 is invalid: must be > 0"], logs[-2000:]
    assert "Traceback" not in logs
    proc = _run([str(BIN / "ray"), "job", "list", "--address", c["address"]], {**c["env"], "RAY_AUTH_TOKEN": "0" * 32},
                check=False)
    assert proc.returncode != 0 and "token is invalid" in (proc.stdout + proc.stderr)


def test_losing_the_worker_host_midway_resumes_on_the_head_and_registers_once(onprem, creds):
    """Ray on the worker host is killed once the job has a checkpoint on the shared export: Ray Train
    restarts the workers where there is room (SPREAD lets both land on the head), resumes from the
    export and finishes; the model is registered once."""
    c = onprem
    name = "onprem-fault"
    sub = _submit(c, "python", "experiments/rcm_digits.py", "finetune", "--sigma", "0.5", *TINY,
                  "--set", "train.steps=30", "--set", "train.checkpoint_every=5", "--set", f"train.name={name}",
                  "--set", "tracking.register_as=rcm-digits-fault", "--set", "train.max_failures=3")
    job_dir, deadline = c["shared"] / "results" / name, time.time() + 300
    while not list(job_dir.glob("checkpoint_*")):
        assert time.time() < deadline and _status(c, sub) in ("PENDING", "RUNNING"), "no checkpoint was written"
        time.sleep(1)
    worker = c["hosts"].hosts[1]
    worker.run(f"{BIN / 'ray'} stop --force")
    assert not any(p in worker.processes() for p in ("raylet", "gcs_server"))
    status, logs = _wait(c, sub)
    assert status == "SUCCEEDED", logs[-5000:]
    assert f"{name}: resuming at step " in logs, logs[-4000:]
    assert (job_dir / "model.pt").is_file()
    versions = _client(c).search_model_versions("name='rcm-digits-fault'")
    assert len(versions) == 1


def test_ray_down_stops_every_process_it_started(onprem):
    c = onprem
    _run([str(BIN / "ray"), "down", "-y", str(c["file"])], c["env"], timeout=300)
    deadline = time.time() + 60  # the MLflow server's watcher stops it within seconds of Ray (graceful exit)
    for h in c["hosts"].hosts:
        while True:
            procs = h.run("ps -eo args=").stdout.splitlines()
            left = [p for p in procs if re.search(r"raylet|gcs_server|mlflow|uvicorn|huey|default_worker", p)]
            if not left or time.time() > deadline:
                break
            time.sleep(1)
        assert not left, f"{h.name}: {left}"
