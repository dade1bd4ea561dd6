"""Rank 0's metric log that training never waits on (:class:`BufferedMetricLogger`), and the
idempotent sending of buffered points by (key, step) that it and the driver share."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, cast

from rayrcm.orchestration.tracking import client as _client

# one metric point: (step, key, value, timestamp in ms)
Point = tuple[int, str, float, int]
MAX_BATCH = 1000  # MLflow's limit of metrics per log_batch call


def logged_points(client: Any, run_id: str) -> set[tuple[str, int]]:
    """The (key, step) pairs a run holds already."""
    run = client.get_run(run_id)
    return {(k, m.step) for k in run.data.metrics for m in client.get_metric_history(run_id, k)}


def _send_new(client: Any, run_id: str, batch: list[Point], seen: set[tuple[str, int]]) -> int:
    """Log the points of ``batch`` whose (key, step) is not in ``seen`` (the first of a pair wins,
    as the run's own first point did); returns how many were sent."""
    from mlflow.entities import Metric

    fresh: dict[tuple[str, int], Point] = {}
    for p in batch:
        if (p[1], p[0]) not in seen:
            fresh.setdefault((p[1], p[0]), p)
    items = list(fresh.values())
    for i in range(0, len(items), MAX_BATCH):
        client.log_batch(run_id, metrics=[Metric(k, v, ts, step) for step, k, v, ts in items[i : i + MAX_BATCH]])
    seen.update(fresh)
    return len(fresh)


def send_points(uri: str, run_id: str, points: list[Point]) -> int:
    """Log buffered points (kept by a run that could not send them), skipping those the run holds."""
    client = _client(uri)
    return _send_new(client, run_id, [cast(Point, tuple(p)) for p in points], logged_points(client, run_id))


class BufferedMetricLogger:
    """Rank 0's metric log: training never waits for the tracking server.

    ``log`` queues the points; a background thread sends them, each request failing fast (no
    MLflow HTTP retries, ``request_timeout_s``) and retried every ``retry_s`` while the server is
    away. The first failure prints one warning line and training goes on; when the server answers
    again the buffered points go out and one line says so. Sending is idempotent by (key, step):
    points a run already holds (a step replayed after a resume, a re-validation of the last step)
    are not sent twice. :meth:`close` waits at most ``timeout_s`` and returns the points still
    unsent, which the caller keeps for the job's next run (``pending`` sends them first);
    :meth:`pending` is what a checkpoint keeps, so a worker killed during an outage loses nothing.
    """

    def __init__(self, uri: str, run_id: str, *, say=print, pending: Sequence[Point] = (), retry_s: float = 5.0,
                 request_timeout_s: float = 10.0, system_metrics: bool = False) -> None:
        import threading

        # this process (a Ray Train worker) talks to MLflow only through this logger: fail fast
        os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
        os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(int(max(request_timeout_s, 1)))
        self.uri, self.run_id, self.say, self.retry_s = uri, run_id, say, retry_s
        self._points: list[Point] = list(pending)
        self._want_running = False
        self._closing = False
        self._deadline: float | None = None
        self._cond = threading.Condition()
        self._seen: set[tuple[str, int]] | None = None  # (key, step) the run holds; loaded on first contact
        self.down_since: float | None = None
        self.sent = 0
        self._monitor = None
        if system_metrics:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            os.environ.setdefault("MLFLOW_TRACKING_URI", uri)
            self._monitor = SystemMetricsMonitor(run_id)
            self._monitor.start()
        self._thread = threading.Thread(target=self._run, name="rayrcm-metrics", daemon=True)
        self._thread.start()

    def log(self, step: int, metrics: dict[str, float]) -> None:
        import time

        now = int(time.time() * 1000)
        with self._cond:
            self._points += [(int(step), k, float(v), now) for k, v in metrics.items()]
            self._cond.notify()

    def pending(self) -> list[Point]:
        """The points not sent yet (rank 0 keeps them in each checkpoint: a killed worker loses none)."""
        with self._cond:
            return list(self._points)

    def add(self, points: list[Point]) -> None:
        """Queue points kept earlier (a checkpoint's, the job's unsent file); sent unless the run has them."""
        with self._cond:
            self._points += [cast(Point, tuple(p)) for p in points]  # a JSON file's lists as tuples
            self._cond.notify()

    def mark_running(self) -> None:
        """Mark the run RUNNING (sent in order with the metrics, never blocking the caller)."""
        with self._cond:
            self._want_running = True
            self._cond.notify()

    def _run(self) -> None:
        client = _client(self.uri)
        while True:
            with self._cond:
                while not (self._points or self._want_running or self._closing):
                    self._cond.wait()
                if not (self._points or self._want_running):
                    return
                batch, want_running = list(self._points[:MAX_BATCH]), self._want_running
            try:
                self._send(client, batch, want_running)
            except Exception as err:  # noqa: BLE001 - any failure to reach the server: keep the points, retry
                self._failed(err)
                with self._cond:
                    if self._closing and self._deadline_passed():
                        return
                    self._cond.wait(self.retry_s if not self._closing else min(self.retry_s, 1.0))
                continue
            with self._cond:
                del self._points[: len(batch)]
                self._want_running = self._want_running and not want_running
                backlog = len(self._points)
            if self.down_since is not None and not backlog:
                self.say(f"[rayrcm] MLflow server {self.uri} answers again: buffered metrics sent")
                self.down_since = None

    def _send(self, client: Any, batch: list[Point], want_running: bool) -> None:
        from mlflow.entities import RunStatus

        if self._seen is None:
            self._seen = logged_points(client, self.run_id)
        if want_running:
            client.update_run(self.run_id, status=RunStatus.to_string(RunStatus.RUNNING))
        self.sent += _send_new(client, self.run_id, batch, self._seen)

    def _failed(self, err: Exception) -> None:
        import time

        if self.down_since is None:
            self.down_since = time.monotonic()
            reason = str(err).splitlines()[0][:160] if str(err) else type(err).__name__
            self.say(f"[rayrcm] warning: MLflow server {self.uri} unreachable ({reason}); training goes on, "
                     "metrics are buffered and sent when it answers")

    def _deadline_passed(self) -> bool:
        import time

        return self._deadline is not None and time.monotonic() >= self._deadline

    def close(self, timeout_s: float = 30.0) -> list[Point]:
        """Send what is buffered, waiting at most ``timeout_s``; returns the points left unsent."""
        import time

        with self._cond:
            self._closing = True
            self._deadline = time.monotonic() + timeout_s
            self._cond.notify()
        self._thread.join(timeout_s + 1.0)
        if self._monitor is not None:
            self._monitor.finish()
        with self._cond:
            return list(self._points)
