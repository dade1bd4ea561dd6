"""The MLflow tracking server a cluster's head node runs: ``rayrcm mlflow-server``.

A thin launcher around ``mlflow server`` that makes the secure setup the default:

* **Basic auth on** (``--app-name basic-auth``). The admin user and password are the ones MLflow
  clients already read: ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD`` or the
  ``[mlflow]`` section of ``~/.mlflow/credentials``. The cluster recipes copy that one file to
  every node (``file_mounts``), so the server, the job drivers and the rank-0 workers agree on it
  without the password ever appearing in a command line, a job's metadata or the Ray dashboard.
  ``default_permission = NO_PERMISSIONS``: an unknown user sees nothing.
* The auth database, the Flask session secret (generated once) and the auth config live in
  ``--state-dir`` (default ``~/.rayrcm/mlflow``), so restarting the server keeps users. They and
  the ``--detach`` log are mode 0600.
* Artifacts are proxied (``--serve-artifacts``) to ``--artifacts-destination`` (an ``s3://`` or
  ``gs://`` bucket on a cluster): only the head node needs bucket credentials.

``--no-auth`` gives a plain server (a laptop, loopback only). ``--detach`` starts it in the
background, waits until ``/health`` answers and prints its pid; the cluster files use that, with
``--stop-with-ray``: a watcher stops the server once the host's Ray, started after it, has stopped,
so ``ray down`` leaves no server behind.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from rayrcm.errors import ConfigError

MIN_PASSWORD = 12
RAY_PROCESSES = ("raylet", "gcs_server")  # a host runs Ray while one of these runs


@dataclass(frozen=True)
class ServerSpec:
    backend_store_uri: str
    artifacts_destination: str
    host: str = "127.0.0.1"
    port: int = 5000
    workers: int = 2
    auth: bool = True
    state_dir: str = "~/.rayrcm/mlflow"
    allowed_hosts: str = ""  # "" = MLflow's default (localhost and private addresses)

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{host}:{self.port}"


def admin_credentials() -> tuple[str, str]:
    """The admin user the server creates on first start, from where MLflow clients read theirs."""
    from mlflow.utils.credentials import read_mlflow_creds

    creds = read_mlflow_creds()
    if not creds.username or not creds.password:
        raise ConfigError("mlflow credentials", "missing",
                          "write [mlflow] mlflow_tracking_username/mlflow_tracking_password to ~/.mlflow/credentials "
                          "(or set MLFLOW_TRACKING_USERNAME/PASSWORD), or pass --no-auth")
    if len(creds.password) < MIN_PASSWORD:
        raise ConfigError("mlflow_tracking_password", "<hidden>", f"must have at least {MIN_PASSWORD} characters")
    return creds.username, creds.password


def _validate(spec: ServerSpec) -> None:
    if not 0 < spec.port < 65536:
        raise ConfigError("--port", spec.port, "must be in 1..65535")
    if spec.workers < 1:
        raise ConfigError("--workers", spec.workers, "must be >= 1")
    if "://" not in spec.backend_store_uri:
        raise ConfigError("--backend-store-uri", spec.backend_store_uri, "use sqlite:////abs/path/mlflow.db or postgresql://...")
    if not spec.auth and spec.host not in ("127.0.0.1", "localhost", "::1"):
        raise ConfigError("--host", spec.host, "a server without auth must listen on loopback only (drop --no-auth)")


def private_file(path: Path) -> Path:
    """Create ``path`` if missing, and make it mode 0600 either way (whatever the umask)."""
    os.close(os.open(path, os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o600))
    os.chmod(path, 0o600)
    return path


def command(spec: ServerSpec) -> tuple[list[str], dict[str, str]]:
    """The ``mlflow server`` command line and the environment it needs (secrets go in the env and
    in 0600 files, never on the command line)."""
    _validate(spec)
    env = dict(os.environ)
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", spec.host, "--port", str(spec.port),
           "--workers", str(spec.workers), "--backend-store-uri", spec.backend_store_uri,
           "--serve-artifacts", "--artifacts-destination", spec.artifacts_destination]
    if spec.allowed_hosts:
        cmd += ["--allowed-hosts", spec.allowed_hosts]
    if spec.auth:
        user, password = admin_credentials()
        state = Path(spec.state_dir).expanduser()
        state.mkdir(parents=True, exist_ok=True, mode=0o700)
        state.chmod(0o700)
        secret = state / "flask_secret_key"
        if not secret.exists():
            private_file(secret)
            secret.write_text(secrets.token_hex(32))
        private_file(secret)
        private_file(state / "basic_auth.db")  # sqlite fills an empty file; its journals copy its mode
        ini = private_file(state / "basic_auth.ini")
        ini.write_text("[mlflow]\ndefault_permission = NO_PERMISSIONS\n"
                       f"database_uri = sqlite:///{state / 'basic_auth.db'}\n"
                       "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
        env.update(MLFLOW_AUTH_CONFIG_PATH=str(ini), MLFLOW_AUTH_ADMIN_USERNAME=user, MLFLOW_AUTH_ADMIN_PASSWORD=password,
                   MLFLOW_FLASK_SERVER_SECRET_KEY=secret.read_text().strip())
        cmd += ["--app-name", "basic-auth"]
    return cmd, env


def wait_healthy(url: str, timeout: float = 300.0, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-1500:] if log and log.exists() else ""
            raise RuntimeError(f"mlflow server exited with {proc.returncode}: {tail}")
    raise RuntimeError(f"mlflow server at {url} did not answer /health within {timeout:.0f} s")


def start(spec: ServerSpec, log: str | Path, timeout: float = 300.0) -> subprocess.Popen:
    """Start the server in its own session, wait until it answers, return the process."""
    cmd, env = command(spec)
    log = Path(log).expanduser()
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(private_file(log), "ab") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    try:
        wait_healthy(spec.url, timeout, proc, log)
    except Exception:
        proc.kill()
        raise
    return proc


def port_taken(host: str, port: int) -> bool:
    """Whether something already listens on ``host:port`` (binding it fails), so a new server could not
    start there while whatever answers there would pass its health check."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will: TIME_WAIT does not count
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def _running(names: tuple[str, ...]) -> bool:
    import psutil

    return any(p.info["name"] in names for p in psutil.process_iter(["name"]))


def _alive(pid: int) -> bool:
    """Whether the process group ``pid`` has a process (its leader, if still there, not a zombie)."""
    import psutil

    try:
        os.killpg(pid, 0)
    except OSError:
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True  # the leader is gone, the rest of its group is not


def stop_with_ray(pid: int, poll_s: float = 1.0, wait_for_ray_s: float = 900.0,
                  ray_processes: tuple[str, ...] = RAY_PROCESSES) -> bool:
    """Stop the server whose process group is ``pid`` once Ray, which starts on this host after it
    (within ``wait_for_ray_s``), is no longer running here (no process named as Ray's); True if it
    was stopped."""
    import signal

    deadline = time.monotonic() + wait_for_ray_s
    while not _running(ray_processes):
        if time.monotonic() > deadline or not _alive(pid):
            return False  # Ray never came (or the server went): the server is someone else's to stop
        time.sleep(poll_s)
    while _running(ray_processes) and _alive(pid):
        time.sleep(poll_s)
    if not _alive(pid):
        return False
    os.killpg(pid, signal.SIGTERM)
    for _ in range(int(30 / poll_s)):
        if not _alive(pid):
            return True
        time.sleep(poll_s)
    os.killpg(pid, signal.SIGKILL)
    return True


def _watch(pid: int) -> None:
    """A detached watcher process running :func:`stop_with_ray` for the server ``pid``."""
    code = f"from rayrcm.orchestration.mlflow_server import stop_with_ray; stop_with_ray({int(pid)})"
    subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL, start_new_session=True)


def serve(spec: ServerSpec, *, detach: bool = False, log: str = "~/.rayrcm/mlflow/server.log",
          pidfile: str = "", stop_with_ray_: bool = False) -> int:
    """``rayrcm mlflow-server``: run in the foreground (exec), or ``detach`` and print the pid. A port
    something already listens on is refused first: the new server would fail to bind while the old
    one answered its health check, and the start would report a server that is not this one."""
    if port_taken(spec.host, spec.port):
        raise ConfigError("--port", spec.port, f"something already listens on {spec.host}:{spec.port} (another MLflow "
                                               "server?); stop it or choose another --port")
    if not detach:
        cmd, env = command(spec)
        os.execve(cmd[0], cmd, env)
    try:
        proc = start(spec, log)
    except RuntimeError as err:
        print(f"rayrcm: error: {str(err).strip().splitlines()[-1]} (log: {Path(log).expanduser()})", file=sys.stderr)
        return 1
    if pidfile:
        Path(pidfile).expanduser().write_text(str(proc.pid))
    if stop_with_ray_:
        _watch(proc.pid)
    kind = "basic auth" if spec.auth else "no auth, loopback only"
    print(f"[rayrcm] MLflow server ({kind}) at {spec.url}, pid {proc.pid}, log {Path(log).expanduser()}")
    return 0
