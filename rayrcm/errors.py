"""The errors users see as one line: bad input (:class:`ConfigError`, naming the key, the value and
what is allowed, exit 2) and a run that cannot go on (:class:`RunFailed`: :class:`NonFiniteLoss`,
:class:`TrackingUnavailable`, exit 1)."""


class ConfigError(ValueError):
    """Bad user input, reported before any cluster work starts."""

    def __init__(self, key: str, value: object, allowed: str) -> None:
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"{key}={value!r} is invalid: {allowed}")


class RunFailed(RuntimeError):
    """A run that could not go on for a reason other than its input; one line for the user."""


class NonFiniteLoss(RunFailed):
    """The training loss became NaN or infinite: the run stops before that step's update, and no
    checkpoint, model or registration follows it. Retrying cannot help (the steps are deterministic)."""

    def __init__(self, step: int, value: float) -> None:
        self.step, self.value = step, value
        super().__init__(f"loss is {value} at step {step}: training stopped; no checkpoint or model was saved after it "
                         "(lower optim.lr, set optim.grad_clip, or check the data and method settings)")

    def __reduce__(self):  # picklable with its arguments (Ray ships worker errors to the driver)
        return (type(self), (self.step, self.value))


class TrackingUnavailable(RunFailed):
    """The driver could not reach the MLflow server at ``uri``; ``state`` says what was kept."""

    def __init__(self, uri: str, reason: str, state: str = "") -> None:
        self.uri, self.reason, self.state = uri, reason, state
        super().__init__(f"MLflow server {uri} is unreachable ({reason})" + (f": {state}" if state else ""))

    def __reduce__(self):
        return (type(self), (self.uri, self.reason, self.state))


def choose_one_of(options: tuple[str, ...] | list[str], value: object) -> str:
    """``"choose one of: a, b, c"``, with the nearest option when ``value`` looks like a typo of it."""
    import difflib

    near = difflib.get_close_matches(str(value), list(options), n=1, cutoff=0.6)
    return f"choose one of: {', '.join(options)}" + (f" (did you mean {near[0]}?)" if near else "")
