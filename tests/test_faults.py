"""Fault injection (issue 13): what a run does with a non-finite loss or
gradient, and with a NaN validation score."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from distillkit.cli import app
from distillkit.errors import DistillkitError
from distillkit.pipeline import train
from distillkit.run import Run


def _nan_logits_from(monkeypatch: pytest.MonkeyPatch, method: str, step: int, *, until: int | None = None) -> None:
    """In runs of ``method`` (not the cached SFT runs that prepare the models), from
    optimizer step ``step`` (1-based) on (up to ``until``), the student's logits are NaN."""
    original = Run.student_logits

    def poisoned(self: Run, batch):
        logits = original(self, batch)
        if self.config.method == method and step <= self.step + 1 <= (until or 10**9) and torch.is_grad_enabled():
            return logits * float("nan")
        return logits

    monkeypatch.setattr(Run, "student_logits", poisoned)


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _finite_weights(folder: Path) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in load_file(folder / "model.safetensors").values())


@pytest.mark.parametrize("method", ["kd", "promptkd"])
def test_a_nan_loss_stops_the_run_and_keeps_the_last_checkpoint(method, recipe_file, tmp_path, monkeypatch):
    _nan_logits_from(monkeypatch, method, 3)
    with pytest.raises(DistillkitError, match=r"step 3: the loss of \w+ is not finite.*step-0000002, is kept"):
        train(method, str(recipe_file(steps=6, eval_every=2)), output=tmp_path / "run")
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert checkpoints == ["step-0000002"]
    assert _finite_weights(tmp_path / "run" / "checkpoints" / "step-0000002")
    assert _finite_weights(tmp_path / "run" / "best")
    assert [r["step"] for r in _records(tmp_path / "run") if "val/rougeL" not in r] == [1, 2]


def test_a_diverging_run_exits_non_zero_with_one_line(recipe_file, tmp_path):
    result = CliRunner().invoke(app, ["train", "--method", "kd", "--recipe", str(recipe_file(steps=6)),
                                      "--output", str(tmp_path / "run"), "--set", "training.lr=1e30"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and "not finite" in errors[0] and "training.lr" in errors[0], result.stderr


def test_skip_counts_skipped_updates_and_finishes(recipe_file, tmp_path, monkeypatch):
    _nan_logits_from(monkeypatch, "kd", 3, until=3)
    train("kd", str(recipe_file(steps=5, eval_every=5)), output=tmp_path / "run",
          overrides=["training.on_nonfinite=skip"])
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-0000005" / "trainer_state.json").read_text())
    assert state["skipped_updates"] == 1
    records = {r["step"]: r for r in _records(tmp_path / "run") if "val/rougeL" not in r}
    assert records[3]["skipped/student"] == 1 and math.isnan(records[3]["loss"])  # the NaN is reported as NaN
    assert "skipped/student" not in records[4]
    assert _finite_weights(tmp_path / "run" / "checkpoints" / "step-0000005")


def test_a_nan_validation_score_never_becomes_best(recipe_file, tmp_path, monkeypatch):
    import distillkit.trainer as trainer_module

    original = trainer_module.Trainer.validation_loss_sum
    calls = {"n": 0}

    def nan_first(self, examples):  # the first validation scores NaN, the next ones are finite
        calls["n"] += 1
        total, tokens = original(self, examples)
        return (float("nan"), tokens) if calls["n"] == 1 else (total, tokens)

    monkeypatch.setattr(trainer_module.Trainer, "validation_loss_sum", nan_first)
    train("sft", str(recipe_file(steps=4, eval_every=2)), output=tmp_path / "run",
          overrides=["training.select_by=loss"])
    best = json.loads((tmp_path / "run" / "best" / "best.json").read_text())
    assert best["step"] == 4 and math.isfinite(best["loss"])  # before: NaN at step 2 stayed "best" forever
