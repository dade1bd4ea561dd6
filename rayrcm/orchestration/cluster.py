"""The Ray cluster a job runs on: connect or start it, and check before any work that it can hold
the job (GPUs, CPUs per worker, workers), failing in one line instead of waiting forever. Used by
training, sweeps, certification and evaluation alike."""

from __future__ import annotations

import os
import time
from typing import Any

from rayrcm.errors import ConfigError

GPU_WAIT_ENV = "RAYRCM_GPU_WAIT_S"  # how long to wait for GPUs on a cluster joined by address (default 300)


def ensure_ray(**kwargs: Any) -> None:
    """Connect to ``RAY_ADDRESS`` when set (a cluster or ``ray job submit``), else start Ray locally
    with a watchdog that stops it when this process ends, SIGKILL included (:mod:`.reaper`)."""
    from rayrcm.orchestration import console

    console.configure()  # no-op for the console filters when ray was imported already
    import ray

    if not ray.is_initialized():  # says so: starting a local cluster takes seconds with nothing else to show
        address = os.environ.get("RAY_ADDRESS")
        print("[rayrcm] starting Ray" + (f" (connecting to {address})" if address else ""), flush=True)
        where = {"address": address} if address else kwargs
        ray.init(**{**console.ray_init_kwargs(), **where}, log_to_driver=True)
        if not address:  # a cluster this process started: it goes when this process goes, even killed
            from rayrcm.orchestration import reaper

            reaper.watch(reaper.cluster_pids())


def _resources_line(res: dict[str, float]) -> str:
    shown = [f"{res[k]:g} {k}" for k in ("CPU", "GPU") if res.get(k)]
    return ", ".join(shown) or "none"


def require_cpus(key: str, value: Any, per_worker: float, workers: int) -> None:
    """Fail with one line when no node of the Ray cluster has ``per_worker`` CPUs, or the cluster has
    fewer than ``workers * per_worker`` (the job would wait forever for them). A cluster joined by
    address (``RAY_ADDRESS``) may autoscale: it is left to wait."""
    if os.environ.get("RAY_ADDRESS"):
        return
    import ray

    cpus = [float(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")]
    biggest, total = max(cpus, default=0.0), sum(cpus)
    if per_worker > biggest:
        raise ConfigError(key, value, f"each worker asks for {per_worker:g} CPUs, and the largest node of the Ray cluster "
                                      f"has {biggest:g} (cluster resources: {_resources_line(ray.cluster_resources())})")
    if workers * per_worker > total:
        raise ConfigError(key, value, f"{workers} workers x {per_worker:g} CPUs = {workers * per_worker:g} CPUs, and the Ray "
                                      f"cluster has {total:g} (cluster resources: {_resources_line(ray.cluster_resources())})")


def require_gpus(key: str, needed: float) -> None:
    """Fail with one line when the Ray cluster cannot hold ``needed`` GPUs (instead of waiting
    forever for them). A local cluster never grows: fail at once. A cluster joined by address
    (``RAY_ADDRESS``) may autoscale: wait up to ``$RAYRCM_GPU_WAIT_S`` seconds (300) first."""
    if needed <= 0:
        return
    import ray

    res = ray.cluster_resources()
    if res.get("GPU", 0) >= needed:
        return
    wait = float(os.environ.get(GPU_WAIT_ENV, "300")) if os.environ.get("RAY_ADDRESS") else 0.0
    if wait > 0:
        print(f"[rayrcm] waiting up to {wait:.0f} s for {needed:g} GPU(s) in the Ray cluster (it has "
              f"{_resources_line(res)}; an autoscaling cluster may add GPU nodes; ${GPU_WAIT_ENV} sets the wait)",
              flush=True)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            time.sleep(min(5.0, max(deadline - time.monotonic(), 0.0)))
            res = ray.cluster_resources()
            if res.get("GPU", 0) >= needed:
                return
    have = res.get("GPU", 0)
    what = "no GPUs" if not have else f"{have:g} GPU(s), {needed:g} needed"
    waited = f" after waiting {wait:.0f} s" if wait > 0 else ""
    raise ConfigError(key, True, f"the Ray cluster has {what}{waited} (cluster resources: {_resources_line(res)})")
