"""A sweep's TensorBoard files: each trial's own metrics against the training step, named by its values.

Replaces Tune's default ``TBXLoggerCallback`` (which logs Tune's bookkeeping, ``done``,
``time_*``, ``pid``..., under ``ray/tune/`` against the report count): only the numbers a trial
reports, at its ``step``; the HParams tab gets each trial's values as Tune's logger gives them.
Imported only where Ray Tune runs (it imports ``ray.tune``).
"""

from __future__ import annotations

import math
from typing import Any

from ray.tune.logger import TBXLoggerCallback

# what Tune adds to every result; none of it is the trial's own
TUNE_KEYS = frozenset({
    "done", "training_iteration", "trial_id", "date", "timestamp", "pid", "hostname", "node_ip", "config",
    "iterations_since_restore", "timesteps_total", "timesteps_since_restore", "episodes_total",
    "should_checkpoint", "checkpoint_dir_name", "experiment_tag", "step",
})


def trial_scalars(result: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a Tune result that the trial reported (no Tune keys, no ``time_*``)."""
    return {k: float(v) for k, v in result.items()
            if k not in TUNE_KEYS and not k.startswith("time_") and isinstance(v, (int, float))
            and not isinstance(v, bool) and math.isfinite(v)}


class StepScalars(TBXLoggerCallback):
    """Tune's TensorBoard logger with the trial's metrics only, at the trial's training step; the
    HParams tab lists the sweep's ``metric`` (the number the trials are ranked by) as its metric, so it
    opens on it rather than on every scalar a trial reports (those stay in the Scalars tab)."""

    def __init__(self, metric: str = "") -> None:
        super().__init__()
        self.metric = metric

    def log_trial_result(self, iteration: int, trial: Any, result: dict[str, Any]) -> None:
        if trial not in self._trial_writer:
            self.log_trial_start(trial)
        step = int(result.get("step") or result.get("training_iteration") or iteration)
        scalars = trial_scalars(result)
        writer = self._trial_writer[trial]
        for key, value in scalars.items():
            writer.add_scalar(key, value, global_step=step)
        # the HParams tab's metrics at the trial's end: the sweep metric when the trial reports it
        self._trial_result[trial] = {self.metric: scalars[self.metric]} if self.metric in scalars else scalars
        writer.flush()
