"""The one exception type users see: a one-line message naming the problem and the fix."""

import difflib
from typing import Any


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


class OptionError(ValueError):
    """An option value out of its range, raised by a config or options
    dataclass's ``__post_init__`` (see :func:`require`); recipe loading turns
    it into a :class:`DistillkitError` naming the recipe key."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field} {problem}")
        self.field, self.problem = field, problem


def require(ok: bool, field: str, rule: str, value: object) -> None:
    """Raise :class:`OptionError` ``FIELD must RULE, got VALUE`` unless ``ok``
    (for the ``__post_init__`` checks of config and options dataclasses)."""
    if not ok:
        raise OptionError(field, f"must {rule}, got {value!r}")


def did_you_mean(name: str, candidates: list[str] | Any) -> str:
    """Return ``" (did you mean 'x'?)"`` for the closest candidate, or ``""``."""
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""
