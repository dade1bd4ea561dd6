"""A quiet console: rayrcm's own lines by default, everything Ray and MLflow print with ``--verbose``.

By default the driver shows the lines that start with ``[rayrcm]`` (the progress line of each
running stage, the certification progress, the summaries) and drops every other line that Ray
forwards from its workers and actors (the TrainController, each rank's ``Reporting training
result``, core worker warnings), plus Ray's banner and Ray Data's and MLflow's INFO lines. Ray's
logs stay complete in its session folder (``/tmp/ray/session_latest/logs``) and the dashboard.

``--verbose`` on the command line, or ``RAYRCM_VERBOSE=1`` in the environment (for ``ray job
submit`` entrypoints), restores everything. Ray reads its filters when it is imported, so
:func:`configure` runs before the first ``import ray`` (the CLI and the recipes call it first);
a user's own values of these variables win.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from collections.abc import Iterator

VERBOSE_ENV = "RAYRCM_VERBOSE"
OUR_LINES = r"^\[rayrcm\] "


def is_verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "").lower() in ("1", "true", "yes", "on")


def configure(verbose: bool | None = None) -> None:
    """Set the console mode for this process and its children (call before importing ray)."""
    if verbose is not None:
        os.environ[VERBOSE_ENV] = "1" if verbose else "0"
    if is_verbose():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS_SKIP_REGEX", "^")  # drop every line forwarded from workers ...
    os.environ.setdefault("RAY_DEDUP_LOGS_ALLOW_REGEX", OUR_LINES)  # ... except ours (allow beats skip)
    os.environ.setdefault("RAY_DISABLE_WORKER_LOG_PREFIX", "1")  # ours without "(RayTrainWorker pid=...)"
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read when mlflow configures its loggers
    for name in ("mlflow", "alembic"):  # in case mlflow was imported already
        logging.getLogger(name).setLevel(logging.WARNING)


@contextlib.contextmanager
def quiet_stderr():
    """Hide what a library prints straight to stderr (MLflow's "Successfully registered model")
    unless verbose; rayrcm prints its own line instead."""
    if is_verbose():
        yield
        return
    with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # MLflow's advice to type-hint pyfunc predict()
        yield


def ray_init_kwargs() -> dict:
    """Extra ``ray.init`` arguments: the driver's ``ray`` logger at ERROR (banner, auth notes)."""
    return {} if is_verbose() else {"logging_level": logging.ERROR}


def quiet_data() -> None:
    """Ray Data's console lines off (after ``import ray.data``); its ``ray-data.log`` keeps them."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False  # our own progress line is steadier than a bar in a log
    if is_verbose():
        return
    ctx.print_on_execution_start = False
    for h in logging.getLogger("ray.data").handlers:
        if type(h).__name__ == "PlainRayHandler":  # the console handler; the file handler keeps everything
            h.setLevel(logging.ERROR)


@contextlib.contextmanager
def quiet_tune() -> Iterator[None]:
    """Tune's console output off unless verbose: its new output engine prints the experiment's
    configuration table even at ``verbose=0``, its legacy one prints nothing at 0 (a user's own
    ``RAY_AIR_NEW_OUTPUT`` wins)."""
    if is_verbose() or "RAY_AIR_NEW_OUTPUT" in os.environ:
        yield
        return
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    try:
        yield
    finally:
        os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
