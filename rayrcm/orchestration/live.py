"""Live progress bars in an interactive terminal; plain periodic ``[rayrcm]`` lines everywhere else.

A terminal (the driver's stdout is a TTY) gets one tqdm bar per long stage: percent, counts,
elapsed time, ETA and the stage's own figures (loss, the latest validation metric, images/s;
samples/s for certification). A job log (``ray job submit``, a redirect, CI) keeps the plain
lines, which read well there. ``RAYRCM_PROGRESS=lines`` forces lines, ``--verbose`` too (Ray's own
output would tear a bar).

Training runs in Ray workers, whose output reaches the driver line by line, so a bar cannot be
drawn there: rank 0 writes its progress to ``<job>/progress.json`` on the job's storage instead of
printing, and :class:`FollowProgress`, a thread of the driver, draws the bar from that file.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import IO, Any

PROGRESS_ENV = "RAYRCM_PROGRESS"  # auto (default) | lines
PROGRESS_FILE = "progress.json"


def interactive(stream: IO[str] | None = None) -> bool:
    """A bar is drawn: ``stream`` (stdout) is a terminal, not verbose, lines not forced."""
    from rayrcm.orchestration.console import is_verbose

    stream = stream if stream is not None else sys.stdout
    if os.environ.get(PROGRESS_ENV, "auto").lower() == "lines" or is_verbose():
        return False
    return bool(getattr(stream, "isatty", lambda: False)())


def bar(total: int, desc: str, unit: str, *, initial: int = 0, stream: IO[str] | None = None) -> Any:
    """A tqdm bar on ``stream`` (stdout); the caller checks :func:`interactive` first."""
    import shutil

    from tqdm import tqdm

    size = shutil.get_terminal_size((120, 24))  # a terminal that reports no size (0 x 0) gets 120 x 24
    return tqdm(total=total, initial=initial, desc=f"[rayrcm] {desc}", unit=unit, file=stream or sys.stdout,
                ncols=size.columns, nrows=size.lines, leave=True, smoothing=0.1)


def advance(bar: Any, done: float, postfix: str, final: bool = False) -> None:
    """Move ``bar`` to ``done`` with ``postfix`` (a fraction moves it within an item; a whole number
    shows as one, ``6/6``); close it on the final tick."""
    bar.update(done - bar.n)
    if float(done).is_integer():
        bar.n = int(done)
    bar.set_postfix_str(postfix, refresh=False)
    if final:
        bar.close()


class FollowProgress(threading.Thread):
    """Draws a stage's bar from its state, polled every ``every_s`` seconds: a training job's
    ``progress.json`` (``source`` a path), or what ``source()`` returns (a sweep's trials); the state
    is ``{"step", "total", "start", "postfix"}``, None while there is none yet."""

    def __init__(self, source: Path | Callable[[], dict[str, Any] | None], desc: str, total: int, *,
                 unit: str = "step", every_s: float = 0.5, stream: IO[str] | None = None) -> None:
        super().__init__(daemon=True, name="rayrcm-progress")
        self.read = source if callable(source) else partial(read_state, source)
        self.desc, self.total, self.unit, self.every_s, self.stream = desc, total, unit, every_s, stream
        self.bar: Any = None
        self._halt = threading.Event()

    def update(self) -> None:
        state = self.read()
        if state is None:
            return
        if self.bar is None:
            self.bar = bar(int(state.get("total", self.total)), self.desc, self.unit, initial=int(state.get("start", 0)),
                           stream=self.stream)
        step = min(int(state["step"]), self.bar.total)
        if step > self.bar.n:
            self.bar.update(step - self.bar.n)
        self.bar.set_postfix_str(str(state.get("postfix", "")), refresh=True)

    def run(self) -> None:
        while not self._halt.wait(self.every_s):
            self.update()

    def close(self, complete: bool = False, postfix: str | None = None) -> None:
        """Stop polling, draw the last state, end the bar's line; ``complete``: the stage ended,
        so the bar ends full (a sweep's trials that a scheduler stopped early leave steps undone);
        ``postfix``: the bar's last words (what the stage's end knows that its running state did not)."""
        self._halt.set()
        if self.is_alive():
            self.join(timeout=5)
        self.update()
        if self.bar is not None:
            if postfix is not None:
                self.bar.set_postfix_str(postfix, refresh=False)
            if complete and self.bar.n < self.bar.total:
                self.bar.update(self.bar.total - self.bar.n)
            self.bar.close()


def read_state(path: Path) -> dict[str, Any] | None:
    """A ``progress.json``'s state; None before it is written (or while it is being replaced)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # not written yet, or being replaced
