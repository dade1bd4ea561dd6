"""A local Ray cluster dies with the rayrcm process that started it, even when that process is
killed with SIGKILL.

Ray ties its head processes (GCS, raylet) and its workers to the driver that started them, but its
dashboard and runtime-env agents, on noticing their raylet gone, first try to report that to the
GCS (which died with it) and only exit when that report times out, a minute later. ``rayrcm``
therefore starts this watchdog beside every local cluster it starts (:func:`watch`): a small
process in its own session that waits for the driver to end and then stops the cluster's processes
it was given, each only if it is still the same process (its start time), SIGTERM first, SIGKILL
after a grace period. A driver that ends normally has shut its cluster down already; the watchdog
then finds nothing to stop and exits.

``python -m rayrcm.orchestration.reaper DRIVER_PID PID:START...`` (started by :func:`watch`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

POLL_S = 0.25  # how often the watchdog looks at the driver
GRACE_S = 3.0  # SIGTERM, then SIGKILL after this long


def _start_time(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


def _same(pid: int, start: float) -> bool:
    t = _start_time(pid)
    return t is not None and abs(t - start) < 1e-3


def _running(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def cluster_pids() -> list[int]:
    """The processes of the local cluster this driver started: Ray's head processes and every
    process under them (the agents among them)."""
    import psutil
    import ray

    node = ray._private.worker._global_node  # the node this driver started (None when it joined one)
    if node is None:
        return []
    pids = [info.process.pid for infos in node.all_processes.values() for info in infos if info.process]
    out = set(pids)
    for pid in pids:
        try:
            out.update(child.pid for child in psutil.Process(pid).children(recursive=True))
        except psutil.NoSuchProcess:
            pass
    out.discard(os.getpid())
    return sorted(out)


def watch(pids: list[int]) -> subprocess.Popen | None:
    """Start the watchdog for ``pids`` (this driver's local cluster); None when there is nothing to
    watch or no start time can be read."""
    marks = [f"{pid}:{t!r}" for pid in pids if (t := _start_time(pid)) is not None]
    if not marks:
        return None
    return subprocess.Popen([sys.executable, "-m", "rayrcm.orchestration.reaper", str(os.getpid()), *marks],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, close_fds=True)


def reap(driver: int, marks: list[tuple[int, float]]) -> list[int]:
    """Wait for ``driver`` to end, then stop each process of ``marks`` (pid, start time) that is still
    the same process; returns the pids it signalled."""
    while _running(driver):
        time.sleep(POLL_S)
    left = [(pid, start) for pid, start in marks if _same(pid, start)]
    for pid, _ in left:
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError:
            pass
    deadline = time.monotonic() + GRACE_S
    while time.monotonic() < deadline and any(_same(p, s) and _running(p) for p, s in left):
        time.sleep(POLL_S)
    for pid, start in left:
        if _same(pid, start) and _running(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    return [pid for pid, _ in left]


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C meant for the driver is not meant for its watchdog
    reap(int(sys.argv[1]), [(int(m.split(":")[0]), float(m.split(":", 1)[1])) for m in sys.argv[2:]])
