"""The one exception type users see: a one-line message naming the problem and the fix."""


class DistillkitError(Exception):
    """A user-facing error (bad recipe, data, model pair, plugin, ...).

    The CLI prints its message on one line without a traceback.
    """


class DatasetUnavailable(DistillkitError):
    """A registered dataset whose files are absent for a known ``reason``
    (its ``missing_reason``): evaluation reports it as missing."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"dataset '{name}' is not available: {reason}")
        self.reason = reason
