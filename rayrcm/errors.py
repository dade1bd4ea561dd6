"""The errors users see as one line: bad input (:class:`ConfigError`, naming the key, the value and
what is allowed, exit 2) and a run that cannot go on (:class:`RunFailed`: :class:`NonFiniteLoss`,
:class:`TrackingUnavailable`, exit 1)."""


import re
from typing import Any

MAX_SEED = 2**63 - 1  # seeds go to torch.Generator.manual_seed and NumPy: a signed 64-bit integer
MAX_NAME = 180  # a job's folder name: room below the file system's 255 bytes for a sweep's -<trial> suffix and more
# names users bring from other tools, and the key or value they mean here
SYNONYMS = {"learning_rate": "lr", "lr_rate": "lr", "wd": "weight_decay", "num_epochs": "epochs", "epoch": "epochs",
            "num_steps": "steps", "max_steps": "steps", "bs": "batch_size", "num_workers": "workers",
            "noise_sd": "sigma", "noise_std": "sigma", "num_samples": "n", "gauss": "gaussian"}
_LISTED = re.compile(r"(?:choose one of|has): ([\w.,\- ]+?)(?: \(|;|$)")


def nearest(value: object, options: list[str]) -> str | None:
    """The option ``value`` most likely mistypes (a known synonym, or a close spelling), or None."""
    import difflib

    word = str(value).rsplit(".", 1)[-1]
    if SYNONYMS.get(word.lower()) in options:
        return SYNONYMS[word.lower()]
    squashed = {o.replace("_", "").replace("-", "").lower(): o for o in options}
    if word.replace("_", "").replace("-", "").lower() in squashed:  # resnet-18 -> resnet18
        return squashed[word.replace("_", "").replace("-", "").lower()]
    near = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    return near[0] if near else None


class ConfigError(ValueError):
    """Bad user input, reported before any cluster work starts. When ``allowed`` lists the valid
    names ("choose one of: a, b", "... has: a, b") and the value (or the key's last part, for an
    unknown key) looks like a typo of one, the nearest is added ("did you mean b?")."""

    def __init__(self, key: str, value: object, allowed: str) -> None:
        self.key, self.value, self.allowed = key, value, allowed
        m = _LISTED.search(allowed)
        if m and "did you mean" not in allowed:
            options = [o.strip() for o in m.group(1).split(",") if o.strip()]
            typo = key if "unknown key" in allowed else value
            near = nearest(typo, options)
            if near is not None and near != str(typo):
                allowed = f"{allowed} (did you mean {near}?)"
        self.allowed = allowed
        super().__init__(f"{key}={value!r} is invalid: {allowed}")

    def __reduce__(self) -> tuple[Any, ...]:  # picklable with its arguments: a worker's ConfigError reaches the driver as itself
        return (type(self), (self.key, self.value, self.allowed))


class RunFailed(RuntimeError):
    """A run that could not go on for a reason other than its input; one line for the user."""


class NonFiniteLoss(RunFailed):
    """The training loss became NaN or infinite: the run stops before that step's update, and no
    checkpoint, model or registration follows it. Retrying cannot help (the steps are deterministic)."""

    def __init__(self, step: int, value: float) -> None:
        self.step, self.value = step, value
        super().__init__(f"loss is {value} at step {step}: training stopped; no checkpoint or model was saved after it "
                         "(lower optim.lr, set optim.grad_clip, or check the data and method settings)")

    def __reduce__(self) -> tuple[Any, ...]:  # picklable with its arguments (Ray ships worker errors to the driver)
        return (type(self), (self.step, self.value))


class TrackingUnavailable(RunFailed):
    """The driver could not reach the MLflow server at ``uri``; ``state`` says what was kept."""

    def __init__(self, uri: str, reason: str, state: str = "") -> None:
        self.uri, self.reason, self.state = uri, reason, state
        super().__init__(f"MLflow server {uri} is unreachable ({reason})" + (f": {state}" if state else ""))

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.uri, self.reason, self.state))
