"""The console progress line of a training stage: step/total with the percent done, loss, the
latest validation metric, images/s and ETA, at a steady cadence (at most one line per ``every_s``
seconds, and always the last step). Plain lines: they read the same in a terminal and a job log.
With a ``sink`` (the driver draws a live bar, :mod:`rayrcm.orchestration.live`), each call hands
it the state as JSON instead of printing."""

from __future__ import annotations

import json
import time
from collections.abc import Callable


def duration(seconds: float) -> str:
    s = int(round(max(seconds, 0)))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def progress_state(step: int, total: int, start: int, postfix: str) -> str:
    """The JSON a sink gets (``<job>/progress.json``, drawn by :class:`rayrcm.orchestration.live.FollowProgress`)."""
    return json.dumps({"step": int(step), "total": int(total), "start": int(start), "postfix": postfix})


class Progress:
    """``progress(step, metrics)`` after logged steps; prints through ``say`` when due."""

    def __init__(self, job: str, total: int, start: int, every_s: float, say: Callable[[str], None],
                 clock: Callable[[], float] = time.perf_counter, sink: Callable[[str], None] | None = None) -> None:
        self.job, self.total, self.start, self.every_s, self.say, self.clock = job, total, start, every_s, say, clock
        self.sink = sink
        self.tic = self.last = clock()
        self.printed = False
        self.validation: tuple[str, float] | None = None  # the latest validation metric shown

    def validated(self, metrics: dict[str, float], key: str = "") -> None:
        """Show ``metrics[key]`` (default: the first ``val_`` metric) from now on."""
        keys = [key] if key in metrics else [k for k in metrics if k.startswith("val_") and not k.endswith("_images")]
        if keys:
            self.validation = (keys[0], float(metrics[keys[0]]))

    def postfix(self, metrics: dict[str, float]) -> str:
        """``loss 0.31, lr 0.001, val_acc_clean 0.93, 1,200 img/s``: what follows the step count."""
        shown = [f"loss {metrics['loss']:.4g}"] if "loss" in metrics else []
        shown += [f"lr {metrics['lr']:.3g}"] if "lr" in metrics else []
        shown += [f"{self.validation[0]} {self.validation[1]:.4g}"] if self.validation else []
        shown += [f"{metrics['images_per_s']:,.0f} img/s"] if "images_per_s" in metrics else []
        return ", ".join(shown)

    def line(self, step: int, metrics: dict[str, float]) -> str:
        now = self.clock()
        done = step - self.start
        eta = (now - self.tic) / done * (self.total - step) if done > 0 else float("nan")
        postfix = self.postfix(metrics)
        shown = [postfix] if postfix else []
        left = "done" if step >= self.total else f"ETA {duration(eta)}" if eta == eta else ""
        percent = f"{100 * step / self.total:.0f}%" if self.total else ""
        return (f"[rayrcm] {self.job}: step {step}/{self.total} ({percent}) " + ", ".join(shown)
                + (f", {left}" if left else ""))

    def __call__(self, step: int, metrics: dict[str, float]) -> None:
        if self.sink is not None:
            self.sink(progress_state(step, self.total, self.start, self.postfix(metrics)))
            return
        now = self.clock()
        if step >= self.total or not self.printed or now - self.last >= self.every_s:
            self.say(self.line(step, metrics))
            self.last, self.printed = now, True
