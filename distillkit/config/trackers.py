"""The experiment trackers a recipe may name (``[logging] report_to``):
accelerate's, each checked for its package when the recipe loads, so that a
missing one fails before any model loads (accelerate would skip it)."""

from __future__ import annotations

import importlib.util
import os

from distillkit.errors import DistillkitError, did_you_mean

EXTRA = "pip install 'distillkit[trackers]'"
IN_EXTRA = ("tensorboard", "mlflow")  # the trackers the extra installs
MLFLOW_STORE = ("sqlalchemy", "alembic")  # what MLflow's local SQLite store needs (no MLFLOW_TRACKING_URI)


def known_trackers() -> list[str]:
    """The tracker names accelerate supports, sorted."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    return sorted(LOGGER_TYPE_TO_CLASS)


def tracker_available(name: str) -> bool:
    """Whether the packages of known tracker ``name`` are installed (MLflow
    without ``MLFLOW_TRACKING_URI``: also those of its local SQLite store)."""
    from accelerate.tracking import get_available_trackers

    if name not in {str(tracker) for tracker in get_available_trackers()}:
        return False
    if name == "mlflow" and "MLFLOW_TRACKING_URI" not in os.environ:
        return all(importlib.util.find_spec(package) is not None for package in MLFLOW_STORE)
    return True


def check_trackers(names: list[str]) -> None:
    """Raise unless every name in ``names`` is a known tracker whose packages are installed."""
    known = known_trackers()
    for name in names:
        if name not in known:
            raise DistillkitError(f"logging.report_to: unknown tracker '{name}'{did_you_mean(name, known)}; "
                                  f"known trackers: {', '.join(known)}")
        if not tracker_available(name):
            fix = EXTRA if name in IN_EXTRA else f"pip install {name}"
            raise DistillkitError(f"logging.report_to names '{name}', whose package is not installed here; {fix}, "
                                  "or remove it from logging.report_to")
