"""The errors users see as one line: bad input (:class:`ConfigError`, naming the key, the value and
what is allowed) and a run that cannot go on (:class:`NonFiniteLoss`)."""


class ConfigError(ValueError):
    """Bad user input, reported before any cluster work starts."""

    def __init__(self, key: str, value: object, allowed: str) -> None:
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"{key}={value!r} is invalid: {allowed}")


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite: the run stops before that step's update, and no
    checkpoint, model or registration follows it. Retrying cannot help (the steps are deterministic)."""

    def __init__(self, step: int, value: float) -> None:
        self.step, self.value = step, value
        super().__init__(f"loss is {value} at step {step}: training stopped; no checkpoint or model was saved after it "
                         "(lower optim.lr, set optim.grad_clip, or check the data and method settings)")

    def __reduce__(self):  # picklable with its arguments (Ray ships worker errors to the driver)
        return (type(self), (self.step, self.value))
