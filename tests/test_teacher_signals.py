"""The cached top-k teacher signal end to end (``[teacher_signal] top_k``):
KD on the full signal is KD on the online teacher, the cache is filled once
and shared by another student and another method, every method that reads
the signal trains with a falling loss and resumes exactly, and runs that
cannot use it are refused before any model loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distillkit.config import load_recipe, resolve_run
from distillkit.errors import DistillkitError
from distillkit.registry import registry
from distillkit.training import teacher_signals
from distillkit.training.pipeline import train

from .conftest import assert_resumes_exactly

TOP_K = ["teacher_signal.top_k=16"]
SHARED = ["teacher_signal.top_k=14"]
READERS = sorted(n for n in registry().methods.names() if registry().methods[n].reads_teacher_signal
                 and registry().sources[registry().methods[n].source].fixed_view is not None)


def _records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "val/rougeL" not in r]


@pytest.fixture
def computed_rows(monkeypatch) -> list[int]:
    """The number of batches the teacher's top-k signal is computed for, per fill."""
    calls: list[int] = []
    original = teacher_signals.top_k_rows

    def counting(run, batch, k):
        calls.append(batch.input_ids.shape[0])
        return original(run, batch, k)

    monkeypatch.setattr(teacher_signals, "top_k_rows", counting)
    return calls


def test_kd_on_the_full_signal_is_kd_on_the_online_teacher(recipe_file, tmp_path):
    """k = V: the same losses, up to the fp16 storage of the log-probabilities."""
    recipe = str(recipe_file(steps=3, eval_every=3))
    train("kd", recipe, output=tmp_path / "online")
    vocab = json.loads((tmp_path / "online" / "teacher" / "config.json").read_text())["vocab_size"]
    train("kd", recipe, output=tmp_path / "cached", overrides=[f"teacher_signal.top_k={vocab}"])
    online, cached = _records(tmp_path / "online"), _records(tmp_path / "cached")
    for a, b in zip(online, cached):
        assert b["kl"] == pytest.approx(a["kl"], rel=2e-3, abs=1e-3)
        assert b["ce"] == pytest.approx(a["ce"], rel=2e-3)


def test_the_cache_is_filled_once_and_shared(recipe_file, tmp_path, computed_rows):
    """k = 14 and 8 are used by no other test (the session's tests share one cache folder)."""
    recipe = str(recipe_file(steps=2, eval_every=2))
    train("kd", recipe, output=tmp_path / "first", overrides=SHARED)
    first = sum(computed_rows)
    assert first > 0
    computed_rows.clear()
    train("kd", recipe, output=tmp_path / "other-student", overrides=[*SHARED, "student.init_seed=5"])
    train("abkd", recipe, output=tmp_path / "other-method", overrides=SHARED)
    assert computed_rows == []
    train("kd", recipe, output=tmp_path / "other-k", overrides=["teacher_signal.top_k=8"])
    assert sum(computed_rows) == first  # another k is another cache


def test_a_killed_fill_resumes_with_the_rows_it_lacks(recipe_file, tmp_path, monkeypatch, computed_rows):
    """k = 12 and 10 are used by no other test (the session's tests share one cache folder)."""
    monkeypatch.setattr(teacher_signals, "ROWS_PER_SHARD", 16)  # a shard every 4 batches of 4
    original = teacher_signals.top_k_rows

    def dying(run, batch, k):
        if len(computed_rows) == 10:
            raise KeyboardInterrupt
        return original(run, batch, k)

    monkeypatch.setattr(teacher_signals, "top_k_rows", dying)
    recipe = str(recipe_file(steps=2, eval_every=2))
    with pytest.raises(KeyboardInterrupt):
        train("kd", recipe, output=tmp_path / "killed", overrides=["teacher_signal.top_k=12"])
    monkeypatch.setattr(teacher_signals, "top_k_rows", original)
    computed_rows.clear()
    train("kd", recipe, output=tmp_path / "killed", overrides=["teacher_signal.top_k=12"], resume=True)
    resumed = len(computed_rows)
    computed_rows.clear()
    train("kd", recipe, output=tmp_path / "fresh", overrides=["teacher_signal.top_k=10"])
    assert resumed == len(computed_rows) - 8  # the two shards of 4 batches written before the kill were kept


@pytest.mark.parametrize("method", READERS)
def test_methods_that_read_the_signal_train_with_falling_loss(method, recipe_file, tmp_path):
    train(method, str(recipe_file(steps=10, eval_every=5)), output=tmp_path / method, overrides=TOP_K)
    losses = [r.get("loss", r.get("student/loss")) for r in _records(tmp_path / method)]
    assert sum(losses[-3:]) / 3 < 0.9 * sum(losses[:3]) / 3, losses


def test_a_killed_run_on_the_signal_resumes_to_identical_parameters(recipe_file, tmp_path, monkeypatch):
    assert_resumes_exactly(monkeypatch, tmp_path, "kd", str(recipe_file(steps=4, eval_every=2)), TOP_K)


@pytest.mark.parametrize(("method", "message"), [
    ("gkd", "method 'gkd' trains on sequences its source 'mixture' makes during training.* set teacher_signal.top_k = 0"),
    ("promptkd", "method 'promptkd' reads the teacher's dense logits"),
])
def test_methods_that_cannot_use_it_are_refused_when_the_recipe_loads(recipe_file, method, message):
    with pytest.raises(DistillkitError, match=message):
        resolve_run(load_recipe(str(recipe_file()), TOP_K), method)


def test_a_method_without_a_teacher_ignores_it(recipe_file):
    resolve_run(load_recipe(str(recipe_file()), TOP_K), "sft")


def test_bad_values_are_one_line_errors(recipe_file, tmp_path):
    with pytest.raises(DistillkitError, match="teacher_signal.top_k.*>= 0"):
        load_recipe(str(recipe_file()), ["teacher_signal.top_k=-1"])
    with pytest.raises(DistillkitError, match="top_k is 100000, more than the vocabulary"):
        train("kd", str(recipe_file(steps=1, eval_every=1)), output=tmp_path / "big",
              overrides=["teacher_signal.top_k=100000"])
    with pytest.raises(ValueError, match="temperature-1"):
        train("kd", str(recipe_file(steps=1, eval_every=1)), output=tmp_path / "hot",
              overrides=[*TOP_K, "methods.kd.loss_temperature=2.0"])
