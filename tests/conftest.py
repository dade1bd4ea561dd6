"""Shared fixtures. Ray runs with an isolated HOME (its token auth writes ~/.ray/auth_token there)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from rayrcm.orchestration.mlflow_server import wait_healthy


@pytest.fixture(scope="session")
def isolated_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    old = os.environ.get("HOME")
    os.environ["HOME"] = str(home)
    os.environ.pop("RAY_ADDRESS", None)
    # Ray's session folder (and its "current cluster" file, which a plain ray.init() would join):
    # private to this test session; short, because Ray's socket paths must fit in 107 bytes
    os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="rr", dir="/tmp")
    yield home
    if old is not None:
        os.environ["HOME"] = old


@pytest.fixture(scope="module")
def ray_cluster(isolated_home):
    """A real local Ray cluster (2 CPUs, token auth as Ray sets it), started on first use and kept
    for the session (a module that needs a multi-node cluster shuts it down and makes its own)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=True)
    yield ray


@pytest.fixture(scope="module")
def two_node_cluster(isolated_home):
    """A real 2-node Ray cluster in this machine (``ray.cluster_utils.Cluster``): head and worker
    node with 2 CPUs each; the driver is connected to it for the module."""
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    cluster.add_node(num_cpus=2)
    ray.init(address=cluster.address, log_to_driver=True)
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlflow_server(root: Path, port: int) -> subprocess.Popen:
    """A real ``mlflow server`` on 127.0.0.1:``port``, sqlite backend and artifacts under ``root``
    (a restart on the same root keeps its runs); returns once ``/health`` answers."""
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts")]
    with open(root / "server.log", "a") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=root, start_new_session=True)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", 90, proc, root / "server.log")
    except RuntimeError:
        proc.kill()
        raise
    return proc


def stop_mlflow_server(proc: subprocess.Popen, kill: bool = False) -> None:
    """Stop the server and its worker processes (its own process group); ``kill``: SIGKILL at once,
    as a crash would."""
    import signal

    if proc.poll() is None or kill:
        try:
            os.killpg(proc.pid, signal.SIGKILL if kill else signal.SIGTERM)
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real ``mlflow server`` on 127.0.0.1 with a sqlite backend in a temp dir."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    proc = start_mlflow_server(root, port)
    yield f"http://127.0.0.1:{port}"
    stop_mlflow_server(proc)


REPO = Path(__file__).resolve().parents[1]
