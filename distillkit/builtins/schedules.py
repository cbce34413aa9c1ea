"""Coefficient schedules: ``value(k, K, **params)`` with k the optimizer step
being taken (1..K; 0 is before training) and K the total optimizer steps."""

from __future__ import annotations

import math

from distillkit import hookimpl
from distillkit.api import Schedule


def _progress(k: int, total: int) -> float:
    """Fraction of training done, in [0, 1]."""
    return min(max(k, 0), total) / total if total > 0 else 1.0


def constant(k: int, total: int, value: float = 1.0) -> float:
    return value


def linear(k: int, total: int, start: float = 1.0, end: float = 0.0) -> float:
    """start + (end - start) * k / K; with the defaults (K - k) / K (PromptKD's L_reg weight)."""
    return start + (end - start) * _progress(k, total)


def cosine(k: int, total: int, start: float = 1.0, end: float = 0.0) -> float:
    """Half-cosine from ``start`` at k = 0 to ``end`` at k = K."""
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * _progress(k, total)))


def step(k: int, total: int, start: float = 1.0, factor: float = 0.5, every: float = 0.25) -> float:
    """``start * factor ** n`` after n completed intervals of ``every`` (a fraction of K)."""
    if not 0.0 < every <= 1.0:
        raise ValueError(f"step schedule needs 0 < every <= 1, got {every}")
    # round() absorbs float error at the boundaries (3 * 0.1 > 0.3)
    completed = math.floor(round(_progress(k, total) / every, 9))
    last = math.ceil(round(1.0 / every, 9)) - 1
    return start * factor ** min(completed, last)


BUILTIN_SCHEDULES = [
    Schedule("constant", "the same value at every step", constant, {"value": 1.0}),
    Schedule("linear", "linear from start to end; default (K-k)/K", linear, {"start": 1.0, "end": 0.0}),
    Schedule("cosine", "half-cosine from start to end", cosine, {"start": 1.0, "end": 0.0}),
    Schedule("step", "start * factor^n after each 'every' fraction of training", step,
             {"start": 1.0, "factor": 0.5, "every": 0.25}),
]


@hookimpl
def distillkit_register_schedules() -> list[Schedule]:
    return BUILTIN_SCHEDULES
