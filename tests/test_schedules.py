"""Coefficient schedules value(k, K, **params), and that the built-in schedules
and divergences are reachable through the entry-point plugin registry."""

from __future__ import annotations

import math

import pytest

from distillkit.builtins.divergences import BUILTIN_DIVERGENCES
from distillkit.builtins.schedules import BUILTIN_SCHEDULES, constant, cosine, linear, step
from distillkit.registry import registry


def test_constant():
    assert [constant(k, 10) for k in (-1, 0, 5, 10, 20)] == [1.0] * 5
    assert constant(3, 10, value=0.25) == 0.25


@pytest.mark.parametrize("k,K,expected", [
    (0, 10, 1.0), (10, 10, 0.0), (5, 10, 0.5), (3, 10, 0.7), (50, 200, 0.75),
    (-3, 10, 1.0), (15, 10, 0.0),  # clamped outside [0, K]
])
def test_linear_default_is_remaining_fraction(k, K, expected):
    """(K - k) / K, PromptKD's L_reg weight."""
    assert linear(k, K) == pytest.approx(expected, abs=1e-12)


def test_linear_with_start_and_end():
    assert linear(0, 8, start=2.0, end=4.0) == 2.0
    assert linear(2, 8, start=2.0, end=4.0) == pytest.approx(2.5)
    assert linear(8, 8, start=2.0, end=4.0) == 4.0
    assert linear(0, 0) == 0.0  # no steps: already at the end


@pytest.mark.parametrize("k,expected", [
    (0, 1.0), (100, 0.0), (50, 0.5), (-5, 1.0), (130, 0.0),
    (25, 0.5 * (1 + math.cos(math.pi / 4))), (75, 0.5 * (1 - math.cos(math.pi / 4))),
])
def test_cosine(k, expected):
    assert cosine(k, 100) == pytest.approx(expected, abs=1e-12)


def test_cosine_with_start_and_end():
    assert cosine(0, 10, start=3.0, end=1.0) == pytest.approx(3.0)
    assert cosine(5, 10, start=3.0, end=1.0) == pytest.approx(2.0)
    assert cosine(10, 10, start=3.0, end=1.0) == pytest.approx(1.0)


@pytest.mark.parametrize("k,expected", [
    (0, 1.0), (24, 1.0), (25, 0.5), (49, 0.5), (50, 0.25), (74, 0.25), (75, 0.125), (99, 0.125),
    (100, 0.125), (-1, 1.0), (500, 0.125),
])
def test_step_defaults_halve_every_quarter(k, expected):
    assert step(k, 100) == expected


def test_step_with_parameters():
    assert step(0, 10, start=2.0, factor=0.1, every=0.5) == 2.0
    assert step(4, 10, start=2.0, factor=0.1, every=0.5) == 2.0
    assert step(5, 10, start=2.0, factor=0.1, every=0.5) == pytest.approx(0.2)
    assert step(10, 10, start=2.0, factor=0.1, every=0.5) == pytest.approx(0.2)


def test_step_drops_exactly_at_boundaries_with_every_one_tenth():
    """Regression: boundaries built as i * every in floating point dropped one step late (3 * 0.1 > 0.3)."""
    assert step(29, 100, every=0.1) == 0.5 ** 2
    assert step(30, 100, every=0.1) == 0.5 ** 3  # three tenths of training completed


def test_builtins_are_reachable_through_the_entry_point_registry():
    reg = registry()
    assert reg.schedules["linear"].value(5, 10, **reg.schedules["linear"].params) == pytest.approx(0.5)
    assert reg.divergences["jsd"].params == {"beta": 0.5}
    for schedule in BUILTIN_SCHEDULES:
        entry = reg.schedules.entry(schedule.name)
        assert entry.item is schedule and entry.plugin == "distillkit:schedules"
    for divergence in BUILTIN_DIVERGENCES:
        entry = reg.divergences.entry(divergence.name)
        assert entry.item is divergence and entry.plugin == "distillkit:divergences"
    assert set(reg.schedules.names()) >= {"constant", "linear", "cosine", "step"}
