"""The console progress line of a training stage: step/total with the percent done, loss, the
latest validation metric, images/s and ETA, at a steady cadence (at most one line per ``every_s``
seconds, and always the last step). Plain lines: they read the same in a terminal and a job log."""

from __future__ import annotations

import time
from collections.abc import Callable


def duration(seconds: float) -> str:
    s = int(round(max(seconds, 0)))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class Progress:
    """``progress(step, metrics)`` after logged steps; prints through ``say`` when due."""

    def __init__(self, job: str, total: int, start: int, every_s: float, say: Callable[[str], None],
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.job, self.total, self.start, self.every_s, self.say, self.clock = job, total, start, every_s, say, clock
        self.tic = self.last = clock()
        self.printed = False
        self.validation: tuple[str, float] | None = None  # the latest validation metric shown

    def validated(self, metrics: dict[str, float], key: str = "") -> None:
        """Show ``metrics[key]`` (default: the first ``val_`` metric) from now on."""
        keys = [key] if key in metrics else [k for k in metrics if k.startswith("val_") and not k.endswith("_images")]
        if keys:
            self.validation = (keys[0], float(metrics[keys[0]]))

    def line(self, step: int, metrics: dict[str, float]) -> str:
        now = self.clock()
        done = step - self.start
        eta = (now - self.tic) / done * (self.total - step) if done > 0 else float("nan")
        shown = [f"loss {metrics['loss']:.4g}"] if "loss" in metrics else []
        shown += [f"lr {metrics['lr']:.3g}"] if "lr" in metrics else []
        shown += [f"{self.validation[0]} {self.validation[1]:.4g}"] if self.validation else []
        shown += [f"{metrics['images_per_s']:,.0f} img/s"] if "images_per_s" in metrics else []
        left = "done" if step >= self.total else f"ETA {duration(eta)}" if eta == eta else ""
        percent = f"{100 * step / self.total:.0f}%" if self.total else ""
        return (f"[rayrcm] {self.job}: step {step}/{self.total} ({percent}) " + ", ".join(shown)
                + (f", {left}" if left else ""))

    def __call__(self, step: int, metrics: dict[str, float]) -> None:
        now = self.clock()
        if step >= self.total or not self.printed or now - self.last >= self.every_s:
            self.say(self.line(step, metrics))
            self.last, self.printed = now, True
