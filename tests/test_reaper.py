"""A local Ray cluster goes with the rayrcm process that started it, even one killed with SIGKILL
(Ray's dashboard and runtime-env agents alone stay a minute, trying to tell the dead GCS); the
watchdog never signals a process that is not the one it was given (a reused pid)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from rayrcm.orchestration import reaper


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _sleeper(ignore_term: bool = False) -> subprocess.Popen:
    code = "import signal, time\n" + ("signal.signal(signal.SIGTERM, signal.SIG_IGN)\n" if ignore_term else "") + \
        "print('up', flush=True)\ntime.sleep(600)"
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "up"
    return p


def test_the_watchdog_stops_its_processes_when_the_driver_ends_and_no_other(tmp_path):
    driver, polite, stubborn, stranger = _sleeper(), _sleeper(), _sleeper(ignore_term=True), _sleeper()
    try:
        marks = [(p.pid, psutil.Process(p.pid).create_time()) for p in (polite, stubborn)]
        marks.append((stranger.pid, psutil.Process(stranger.pid).create_time() - 5.0))  # its pid, another process
        driver.kill()
        driver.wait()
        tic = time.monotonic()
        signalled = reaper.reap(driver.pid, marks)
        assert sorted(signalled) == sorted([polite.pid, stubborn.pid])
        assert polite.wait(timeout=5) == -signal.SIGTERM and stubborn.wait(timeout=5) == -signal.SIGKILL
        assert time.monotonic() - tic < reaper.GRACE_S + 2
        assert _alive(stranger.pid)  # a reused pid is never signalled
    finally:
        for p in (driver, polite, stubborn, stranger):
            p.kill()
            p.wait()


@pytest.mark.slow  # a real local Ray cluster, started by rayrcm in a driver that is then killed
def test_a_driver_killed_with_sigkill_leaves_no_ray_process(tmp_path):
    temp = f"/tmp/rr{os.getpid()}"  # Ray's socket paths must stay short
    driver = tmp_path / "driver.py"
    driver.write_text(textwrap.dedent(f"""
        import os, time
        from rayrcm.orchestration.cluster import ensure_ray
        ensure_ray(num_cpus=1, include_dashboard=False, _temp_dir={temp!r})
        import ray

        @ray.remote
        def pid():
            return os.getpid()

        print("worker", ray.get(pid.remote()), flush=True)
        time.sleep(600)
    """))
    env = {**os.environ, "HOME": str(tmp_path), "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, str(driver)], env=env, stdout=subprocess.PIPE, text=True)
    family: list[psutil.Process] = []
    try:
        lines = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not any(line.startswith("worker") for line in lines):
            lines.append(proc.stdout.readline())
        assert any(line.startswith("worker") for line in lines), lines
        time.sleep(1.0)
        family = psutil.Process(proc.pid).children(recursive=True)
        names = " ".join(p.name() + " " + " ".join(p.cmdline()[:1]) for p in family)
        assert "raylet" in names and "gcs_server" in names
        assert any("DashboardAgent" in " ".join(p.cmdline()) or "RuntimeEnvAgent" in " ".join(p.cmdline()) for p in family)
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 20  # without the watchdog the agents stay about 60 s
        while time.monotonic() < deadline and any(_alive(p.pid) for p in family):
            time.sleep(0.25)
        left = [(p.pid, " ".join(p.cmdline()[:2])) for p in family if _alive(p.pid)]
        assert not left, f"left running 20 s after the driver was killed: {left}"
    finally:
        proc.kill()
        for p in family:  # nothing this test started outlives it (and nothing else is touched)
            if _alive(p.pid):
                p.kill()
        subprocess.run(["rm", "-rf", temp], check=False)
