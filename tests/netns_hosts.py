"""Real hosts made on one machine, for the test of ``ray up`` with ``clusters/onprem.yaml``.

Each host is a Linux network namespace joined to a private bridge (addresses of ``SUBNET`` exist
inside the namespaces and on the bridge only, with no route out, so no traffic leaves the machine),
with its own PID, mount and UTS namespaces: its own processes (``ray stop`` on one host stops that
host's Ray only; killing the host's first process ends every process it has), its own ``/home``
(root's home is ``/home/root`` there), ``/tmp`` and ``/mnt``, and its own sshd that admits the key
made for the test. The project's virtualenv is overlaid copy-on-write at its own path inside each
host, so what the cluster file's setup commands install there stays on that host; pip on a host
has no index (no network), only a folder of the build backend's wheels.

PostgreSQL (for the MLflow server's runs) listens on the bridge address, where a team's database
server would be. Everything is undone by :meth:`Hosts.close`, which the test calls in a finalizer.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

SUBNET = "10.213.0"  # private test range: the bridge is .1, host i is .(10 + i)
PACKAGES = {"/usr/sbin/sshd": "openssh-server", "/usr/bin/rsync": "rsync", "/usr/bin/sudo": "sudo",
            "/usr/bin/ssh": "openssh-client"}
PG_BIN = Path("/usr/lib/postgresql")


def _sh(cmd: list[str] | str, timeout: float = 120, check: bool = True, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, shell=isinstance(cmd, str), capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode:
        raise RuntimeError(f"{cmd} -> {proc.returncode}: {(proc.stderr or proc.stdout).strip()[-2000:]}")
    return proc


def pg_bin() -> Path | None:
    found = sorted(PG_BIN.glob("*/bin/initdb"))
    return found[-1].parent if found else None


def install_missing() -> None:
    """Debian's openssh-server, rsync, sudo and postgresql, from the package registry, if missing."""
    want = sorted({pkg for path, pkg in PACKAGES.items() if not Path(path).exists()}
                  | (set() if pg_bin() else {"postgresql"}))
    if not want:
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if _sh(["apt-get", "install", "-y", "-q", "--no-install-recommends", *want], 600, False, env=env).returncode:
        _sh(["apt-get", "update", "-q"], 600, env=env)
        _sh(["apt-get", "install", "-y", "-q", "--no-install-recommends", *want], 600, env=env)


def why_not() -> str | None:
    """Why hosts cannot be made here (None: they can): root, ``ip netns``, a bridge and overlayfs."""
    if os.geteuid() != 0:
        return "making network namespaces needs root"
    if shutil.which("ip") is None or shutil.which("unshare") is None or shutil.which("nsenter") is None:
        return "iproute2 and util-linux (ip, unshare, nsenter) are missing"
    probe = f"rrprobe{os.getpid()}"
    made = _sh(["ip", "netns", "add", probe], check=False)
    if made.returncode:
        return f"ip netns add fails here: {made.stderr.strip()}"
    _sh(["ip", "netns", "del", probe], check=False)
    return None


@dataclass
class Host:
    name: str
    ip: str
    root: Path  # this host's own folders (home, tmp, mnt, the venv's upper layer) and sshd files
    ns: str
    proc: subprocess.Popen | None = None

    @property
    def init_pid(self) -> int:
        """The host's first process (PID 1 inside it), as the machine numbers it."""
        import psutil

        assert self.proc is not None
        children = psutil.Process(self.proc.pid).children()
        return children[0].pid

    def run(self, cmd: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        """``cmd`` on this host, as root in its namespaces (not through SSH)."""
        return _sh(["nsenter", "-t", str(self.init_pid), "-n", "-p", "-m", "-u", "--", "/bin/bash", "-lc", cmd],
                   timeout, check)

    def processes(self) -> list[str]:
        return self.run("ps -eo comm= | sort -u").stdout.split()


@dataclass
class Hosts:
    """``n`` hosts (the first is the head) under ``base``; ``venv`` is the virtualenv overlaid on each."""

    base: Path
    n: int = 2
    venv: Path = field(default_factory=lambda: Path(sys.prefix))
    hosts: list[Host] = field(default_factory=list)
    tag: str = field(default_factory=lambda: f"{os.getpid() % 100000}")
    key: Path = field(init=False)
    shared: Path = field(init=False)  # the folder standing in for the NFS export
    wheels: Path = field(init=False)
    pg: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.key, self.shared, self.wheels = self.base / "id_ed25519", self.base / "nfs-export", self.base / "wheels"
        self.bridge = f"rrbr{self.tag}"

    # ------------------------------------------------------------------ making them

    def up(self) -> Hosts:
        self.base.mkdir(parents=True, exist_ok=True)
        self.shared.mkdir(exist_ok=True)
        self.shared.chmod(0o777)
        _sh(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "rayrcm-test", "-f", str(self.key)])
        self._wheels()
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # sshd's privilege-separation folder
        _sh(["ip", "link", "add", self.bridge, "type", "bridge"])
        _sh(["ip", "addr", "add", f"{SUBNET}.1/24", "dev", self.bridge])
        _sh(["ip", "link", "set", self.bridge, "up"])
        for i in range(self.n):
            self.hosts.append(self._host("head" if i == 0 else f"worker{i}", f"{SUBNET}.{10 + i}", i))
        for h in self.hosts:
            self._wait_ssh(h)
        return self

    def _wheels(self) -> None:
        """The build backend's wheels for pip on the hosts (no index there): from the package
        registry once, as a site's mirror would hold them."""
        self.wheels.mkdir(exist_ok=True)
        if not list(self.wheels.glob("setuptools-*.whl")):
            _sh([sys.executable, "-m", "pip", "download", "-q", "-d", str(self.wheels), "setuptools>=77", "wheel"], 300)

    def _host(self, name: str, ip: str, i: int) -> Host:
        root = self.base / name
        for sub in ("home/root/.ssh", "home/root/.config/pip", "tmp", "mnt", "env/upper", "env/work"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        (root / "tmp").chmod(0o1777)
        home = root / "home" / "root"
        home.chmod(0o700)
        for dot in (".bashrc", ".profile"):  # as useradd -m leaves a new user's home
            if Path("/etc/skel", dot).is_file():
                shutil.copy(Path("/etc/skel", dot), home / dot)
        shutil.copy(f"{self.key}.pub", home / ".ssh" / "authorized_keys")
        (home / ".ssh" / "authorized_keys").chmod(0o600)
        (home / "rayrcm-env").symlink_to(self.venv)  # the image's Python environment (overlaid below)
        (home / ".config" / "pip" / "pip.conf").write_text(
            f"[global]\nno-index = true\nfind-links = {self.wheels}\ndisable-pip-version-check = true\n")
        (root / "hosts").write_text(f"127.0.0.1 localhost\n{ip} {name}\n")
        passwd = Path("/etc/passwd").read_text().replace(":/root:", ":/home/root:")
        (root / "passwd").write_text(passwd)
        _sh(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / "ssh_host_ed25519_key")])
        (root / "sshd_config").write_text("\n".join([
            f"ListenAddress {ip}", "Port 22", f"HostKey {root / 'ssh_host_ed25519_key'}", "PidFile none",
            "AuthorizedKeysFile .ssh/authorized_keys", "PermitRootLogin prohibit-password",
            "PasswordAuthentication no", "KbdInteractiveAuthentication no", "UsePAM no", "PrintMotd no",
            "Subsystem sftp internal-sftp", "MaxStartups 50", "MaxSessions 50", ""]))
        ns = f"rr{self.tag}h{i}"
        veth = f"rr{self.tag}v{i}"
        _sh(["ip", "netns", "add", ns])
        _sh(["ip", "link", "add", veth, "type", "veth", "peer", "name", f"{veth}p"])
        _sh(["ip", "link", "set", veth, "master", self.bridge])
        _sh(["ip", "link", "set", veth, "up"])
        _sh(["ip", "link", "set", f"{veth}p", "netns", ns])
        inside = (f"ip link set lo up && ip link set {veth}p name eth0 && ip addr add {ip}/24 dev eth0 && "
                  f"ip link set eth0 up")
        _sh(["ip", "netns", "exec", ns, "sh", "-c", inside])
        v = self.venv
        boot = " && ".join([
            f"hostname {name}",
            f"mount --bind {root / 'home'} /home", f"mount --bind {root / 'tmp'} /tmp", f"mount --bind {root / 'mnt'} /mnt",
            f"mount --bind {root / 'passwd'} /etc/passwd", f"mount --bind {root / 'hosts'} /etc/hosts",
            f"mount -t overlay overlay -o lowerdir={v},upperdir={root / 'env/upper'},workdir={root / 'env/work'} {v}",
            f"exec /usr/sbin/sshd -D -e -f {root / 'sshd_config'}"])
        log = open(root / "host.log", "w")  # noqa: SIM115 - kept open for the host's life
        proc = subprocess.Popen(["ip", "netns", "exec", ns, "unshare", "--pid", "--fork", "--kill-child",
                                 "--mount-proc", "--mount", "--uts", "--propagation", "private", "--", "/bin/sh", "-c",
                                 boot], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        return Host(name, ip, root, ns, proc)

    def _wait_ssh(self, h: Host, timeout: float = 30) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if h.proc is not None and h.proc.poll() is not None:
                raise RuntimeError(f"host {h.name} did not start: {(h.root / 'host.log').read_text()[-2000:]}")
            if self.ssh(h, "true", check=False).returncode == 0:
                return
            time.sleep(0.5)
        raise RuntimeError(f"no sshd on {h.name} ({h.ip}): {(h.root / 'host.log').read_text()[-2000:]}")

    def ssh(self, h: Host, cmd: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
        return _sh(["ssh", "-i", str(self.key), "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                    "-o", "BatchMode=yes", "-o", "ConnectTimeout=5", "-o", "LogLevel=ERROR", f"root@{h.ip}", cmd],
                   timeout, check)

    # ------------------------------------------------------------------ PostgreSQL on the bridge

    def postgres(self, user: str = "rayrcm", db: str = "mlflow", port: int = 5433) -> str:
        """A PostgreSQL server on the bridge address with ``user`` (a generated password) owning
        ``db``, admitted from the hosts' subnet with scram-sha-256; returns the password."""
        bindir = pg_bin()
        assert bindir is not None, "postgresql is not installed"
        data, sock = self.base / "pg" / "data", self.base / "pg" / "sock"
        sock.mkdir(parents=True, exist_ok=True)
        shutil.chown(self.base / "pg", "postgres")
        shutil.chown(sock, "postgres")
        as_pg = ["runuser", "-u", "postgres", "--"]
        _sh([*as_pg, str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth-local=trust",
             "--auth-host=scram-sha-256"], 120)
        with open(data / "pg_hba.conf", "a") as f:
            f.write(f"host {db} {user} {SUBNET}.0/24 scram-sha-256\n")
        _sh([*as_pg, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(self.base / "pg" / "log"), "-w", "-o",
             f"-k {sock} -h {SUBNET}.1 -p {port}", "start"], 120)
        password = secrets.token_hex(12)
        psql = [*as_pg, str(bindir / "psql"), "-h", str(sock), "-p", str(port), "-U", "postgres", "-v", "ON_ERROR_STOP=1"]
        _sh([*psql, "-c", f"CREATE ROLE {user} LOGIN PASSWORD '{password}'"])
        _sh([*psql, "-c", f"CREATE DATABASE {db} OWNER {user}"])
        self.pg = {"data": data, "bindir": bindir, "host": f"{SUBNET}.1", "port": port, "user": user, "db": db,
                   "password": password}
        return password

    # ------------------------------------------------------------------ faults and teardown

    def kill(self, h: Host) -> None:
        """The host goes away at once: its first process is killed, and with it every process it has."""
        if h.proc is not None and h.proc.poll() is None:
            os.killpg(h.proc.pid, signal.SIGKILL)
            h.proc.wait(30)

    def leftovers(self) -> list[str]:
        """Namespaces, links and processes of these hosts still on the machine."""
        out = [ns for ns in _sh(["ip", "netns", "list"]).stdout.split() if ns.startswith(f"rr{self.tag}h")]
        links = _sh(["ip", "-o", "link", "show"]).stdout
        out += [f"link {name}" for name in (self.bridge, *(f"rr{self.tag}v{i}" for i in range(self.n))) if f" {name}" in links]
        out += [f"host {h.name} process {h.proc.pid}" for h in self.hosts if h.proc is not None and h.proc.poll() is None]
        return out

    def close(self) -> None:
        for h in self.hosts:
            try:
                self.kill(h)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
            _sh(["ip", "netns", "del", h.ns], check=False)
        for i in range(self.n):
            _sh(["ip", "link", "del", f"rr{self.tag}v{i}"], check=False)
        _sh(["ip", "link", "del", self.bridge], check=False)
        if self.pg:
            _sh(["runuser", "-u", "postgres", "--", str(self.pg["bindir"] / "pg_ctl"), "-D", str(self.pg["data"]),
                 "-m", "immediate", "stop"], 60, False)
        time.sleep(0.5)
        for h in self.hosts:  # overlay mounts lived in the hosts' mount namespaces, gone with them
            shutil.rmtree(h.root, ignore_errors=True)
