"""The one error type users see for bad input: one line, naming the key, the value and what is allowed."""


class ConfigError(ValueError):
    """Bad user input, reported before any cluster work starts."""

    def __init__(self, key: str, value: object, allowed: str) -> None:
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"{key}={value!r} is invalid: {allowed}")
