"""Fault injection (issue 13): non-finite losses, NaN validation scores,
hostile or damaged run folders, concurrent cache preparation, and bad input
of every kind, each of which must end in one ``error:`` line (exit 2) before
any model is loaded, with nothing already written changed."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from typer.testing import CliRunner

from distillkit.api import ResponseLogits
from distillkit.cli import app
from distillkit.errors import DistillkitError
from distillkit.training.pipeline import train
from distillkit.training.run import Run


def _nan_logits_from(monkeypatch: pytest.MonkeyPatch, method: str, step: int, *, until: int | None = None) -> None:
    """In runs of ``method`` (not the cached SFT runs that prepare the models), from
    optimizer step ``step`` (1-based) on (up to ``until``), the student's logits are NaN (dense or response
    logits, whichever the method reads)."""
    dense, response = Run.student_logits, Run.student_response_logits

    def poisoning(original, nan_of):
        def poisoned(self: Run, batch):
            logits = original(self, batch)
            if self.config.method == method and step <= self.step + 1 <= (until or 10**9) and torch.is_grad_enabled():
                return nan_of(logits)
            return logits
        return poisoned

    monkeypatch.setattr(Run, "student_logits", poisoning(dense, lambda logits: logits * float("nan")))
    monkeypatch.setattr(Run, "student_response_logits", poisoning(
        response, lambda logits: ResponseLogits(logits.hidden * float("nan"), logits.head, logits.vocab_size)))


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


def test_a_stage_whose_loss_reaches_another_groups_parameters_stops_the_run(recipe_file, tmp_path, monkeypatch):
    """PromptKD's prompt step takes the student's response logits as a constant target; made to carry a
    gradient into the student's output layer (the bug fixed in issue 17), the run stops before the update."""
    original = Run.student_response_logits

    def leaking(self: Run, batch):
        logits = original(self, batch)
        return ResponseLogits(logits.hidden, logits.head, logits.vocab_size, tracks_grad=True)

    monkeypatch.setattr(Run, "student_response_logits", leaking)
    with pytest.raises(DistillkitError, match="'teacher_adapter' stage put gradients into the 'student' parameters"):
        train("promptkd", str(recipe_file(steps=2, eval_every=2)), output=tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


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
    from distillkit.training.validation import Validation

    original = Validation.loss_sum
    calls = {"n": 0}

    def nan_first(self, examples):  # the first validation scores NaN, the next ones are finite
        calls["n"] += 1
        total, tokens = original(self, examples)
        return (float("nan"), tokens) if calls["n"] == 1 else (total, tokens)

    monkeypatch.setattr(Validation, "loss_sum", nan_first)
    train("sft", str(recipe_file(steps=4, eval_every=2)), output=tmp_path / "run",
          overrides=["training.select_by=loss"])
    best = json.loads((tmp_path / "run" / "best" / "best.json").read_text())
    assert best["step"] == 4 and math.isfinite(best["loss"])  # before: NaN at step 2 stayed "best" forever


# --- run folders: no code from a run folder, no mix-ups (issue 13, items 1 and 3) -----


class _SideEffect:
    """A pickle that creates a file when it is unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in _records(run_dir) if "val/rougeL" not in r]


# torch's weights-only unpickler notes the planted pickle's protocol on its way to refusing it
@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
def test_a_pickle_in_a_run_folder_never_runs(recipe_file, tmp_path, caplog):
    import pickle

    recipe, run = str(recipe_file(steps=4, eval_every=2)), tmp_path / "run"
    train("promptkd", recipe, output=run)
    latest = run / "checkpoints" / "step-0000004"
    assert not [p for p in latest.iterdir() if p.name.startswith("custom_checkpoint")]  # no pickled run state
    marker = tmp_path / "pwned"
    for name in ("random_states_0.pkl", "optimizer.bin"):
        (latest / name).write_bytes(pickle.dumps(_SideEffect(marker)))
    train("promptkd", recipe, output=run, resume=True, max_steps=6)
    assert not marker.exists()
    assert "step-0000004 cannot be loaded" in caplog.text  # refused, resumed from step 2
    assert _steps(run) == [1, 2, 3, 4, 5, 6]


def test_a_damaged_latest_checkpoint_falls_back_to_the_one_before(recipe_file, tmp_path, caplog):
    recipe, run = str(recipe_file(steps=4, eval_every=2)), tmp_path / "run"
    train("kd", recipe, output=run)
    weights = run / "checkpoints" / "step-0000004" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    train("kd", recipe, output=run, resume=True, max_steps=5)
    assert "step-0000004 cannot be loaded" in caplog.text
    assert _steps(run) == [1, 2, 3, 4, 5]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000004", "step-0000005"]


def test_a_leftover_tmp_checkpoint_is_never_taken(recipe_file, tmp_path):
    import shutil

    recipe, run = str(recipe_file(steps=2, eval_every=2)), tmp_path / "run"
    train("kd", recipe, output=run)
    leftover = run / "checkpoints" / "step-0000009.tmp"
    shutil.copytree(run / "checkpoints" / "step-0000002", leftover)
    train("kd", recipe, output=run, resume=True, max_steps=3)
    assert _steps(run) == [1, 2, 3]  # resumed from step 2, not "9"


@pytest.mark.parametrize(("method", "overrides", "differs"), [
    ("kd", [], "method is 'sft' there, 'kd' now"),
    ("sft", ["training.lr=0.5"], "training.lr is 0.01 there, 0.5 now"),
])
def test_resume_refuses_another_method_or_recipe(recipe_file, tmp_path, method, overrides, differs):
    recipe, run = str(recipe_file(steps=2, eval_every=2)), tmp_path / "run"
    train("sft", recipe, output=run)
    manifest = (run / "run.json").read_text()
    with pytest.raises(DistillkitError, match=re.escape(differs)):
        train(method, recipe, output=run, resume=True, overrides=overrides)
    assert (run / "run.json").read_text() == manifest  # untouched


def test_resume_may_change_the_step_budget_and_other_methods_sections(recipe_file, tmp_path):
    recipe, run = str(recipe_file(steps=2, eval_every=2)), tmp_path / "run"
    train("sft", recipe, output=run)
    train("sft", recipe, output=run, resume=True,
          overrides=["training.max_steps=3", "training.log_every=2", "methods.kd.kd_ratio=0.3"])
    assert json.loads((run / "run.json").read_text())["training"]["max_steps"] == 3


def test_a_folder_without_a_checkpoint_is_not_reused_silently(recipe_file, tmp_path, monkeypatch):
    """Killed while writing the first checkpoint: the folder holds run.json and
    metrics but no checkpoint; a plain run refuses it, --resume starts over
    without duplicating metric records."""
    from distillkit.training.trainer import Trainer

    recipe, run = str(recipe_file(steps=3, eval_every=3)), tmp_path / "run"

    def killed(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "save_checkpoint", killed)
    with pytest.raises(KeyboardInterrupt):
        train("sft", recipe, output=run)
    monkeypatch.undo()
    assert _steps(run) == [1, 2, 3] and not (run / "checkpoints").exists()
    with pytest.raises(DistillkitError, match=r"of a run without a checkpoint\); pass --resume"):
        train("sft", recipe, output=run)
    train("sft", recipe, output=run, resume=True)
    assert _steps(run) == [1, 2, 3]


def test_two_runs_preparing_the_same_cache_at_once_share_it(recipe_file, tmp_path):
    """Two `distillkit train` processes start together on an empty cache: one
    trains the tokenizer and the teacher, the other waits and reuses them."""
    import os
    import subprocess
    import sys

    recipe = str(recipe_file(steps=2, eval_every=2))
    env = {**os.environ, "DISTILLKIT_CACHE_DIR": str(tmp_path / "cache")}
    command = [sys.executable, "-m", "distillkit", "train", "--method", "kd", "--recipe", recipe]
    runs = [subprocess.Popen([*command, "--output", str(tmp_path / f"run{i}")], env=env, stderr=subprocess.PIPE,
                             text=True) for i in range(2)]
    errors = [run.communicate(timeout=600)[1] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], errors
    teachers = [p for p in (tmp_path / "cache" / "models").glob("*-teacher-sft-*") if p.is_dir()]
    assert len(teachers) == 1 and (teachers[0] / "DONE").is_file()
    assert sum("preparing the teacher" in e for e in errors) == 1  # prepared once, reused by the other run
    weights = [load_file(tmp_path / f"run{i}" / "teacher" / "model.safetensors") for i in range(2)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


# --- one-line errors before any model is loaded (issue 13, item 4) ------------------


def _one_line_error(args: list[str], monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the CLI expecting exit 2 and exactly one ``error:`` line, with no model loaded."""
    import distillkit.training.pipeline as pipeline

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the error")

    monkeypatch.setattr(pipeline, "load_model", no_model)
    monkeypatch.setattr(pipeline, "prepared_model", no_model)
    result = CliRunner().invoke(app, args)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    return errors[0]


def _train_args(recipe: str | Path, *extra: str) -> list[str]:
    return ["train", "--method", "kd", "--recipe", str(recipe), *extra]


@pytest.mark.parametrize(("setting", "message"), [
    ("training.batch_size=0", "'training.batch_size' must be >= 1, got 0"),
    ("training.micro_batch_size=0", "'training.micro_batch_size' must be >= 1"),
    ("training.log_every=0", "'training.log_every' must be >= 1"),
    ("training.lr=-1", "'training.lr' must be a finite number >= 0, got -1"),
    ("training.lr=nan", "'training.lr' must be a finite number >= 0, got nan"),
    ("training.lr=inf", "'training.lr' must be a finite number >= 0, got inf"),
    ("training.adam_betas=[0.9, 1.0]", "'training.adam_betas' must be two numbers in [0, 1)"),
    ("training.max_steps=-1", "'training.max_steps' must be >= 0"),
    ("training.eval_every=-1", "'training.eval_every' must be >= 0"),
    ("methods.gkd.beta=2", "'methods.gkd.beta' must be in [0, 1], got 2.0"),
    ("methods.kd.kd_ratio=2", "'methods.kd.kd_ratio' must be in [0, 1]"),
    ("methods.kd.loss_temperature=0", "'methods.kd.loss_temperature' must be > 0"),
    ("methods.kd.divergence=fkl", "'methods.kd.divergence' must name a registered divergence"),
    ("methods.gkd.on_policy_schedule=lin", "got 'lin' (did you mean 'linear'?)"),
    ("methods.promptkd.prompt_length=0", "'methods.promptkd.prompt_length' must be >= 1"),
    ("methods.minillm.gamma=3", "'methods.minillm.gamma' must be in [0, 1]"),
    ("training.lrr=1", "unknown key 'training.lrr' (did you mean 'lr'?)"),
    ("methods.gkd.temperature=1", "unknown key 'methods.gkd.temperature' (did you mean 'loss_temperature'?)"),
])
def test_bad_options_are_one_line_errors_at_assembly(recipe_file, monkeypatch, setting, message):
    """Every method section is checked when the recipe loads, even for another method."""
    line = _one_line_error(_train_args(recipe_file(), "--set", setting), monkeypatch)
    assert message in line


def test_bad_recipe_files_are_one_line_errors(tmp_path, monkeypatch):
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b'description = "caf\xe9"\n')
    assert "is not UTF-8 text" in _one_line_error(_train_args(binary), monkeypatch)
    orphan = tmp_path / "orphan.toml"
    orphan.write_text('extends = "tinyy"\n')
    line = _one_line_error(_train_args(orphan), monkeypatch)
    assert f"{orphan} extends 'tinyy': unknown recipe 'tinyy' (did you mean 'tiny'?)" in line
    assert "--max-steps must be >= 0" in _one_line_error(_train_args("tiny", "--max-steps", "-2"), monkeypatch)


@pytest.mark.parametrize(("name", "content", "message"), [
    ("bad.jsonl", b'{"instruction": "a", "output": "b"}\n{"instruction": "\xff", "output": "b"}\n',
     "bad.jsonl:2: bytes that are not UTF-8"),
    ("empty.jsonl", b"", "empty.jsonl holds no rows"),
    ("blank.jsonl", b"  \n\n \n", "blank.jsonl holds no rows"),
    ("blank.json", b"  \n", "blank.json holds no rows"),
    ("scalars.json", b'[{"instruction": "a", "output": "b"}, 3]', "scalars.json[1]: expected a JSON object, got int"),
    ("pretty.jsonl", b'[\n  {"instruction": "a", "output": "b"}\n]\n', "pretty.jsonl holds a JSON array"),
])
def test_bad_data_files_are_one_line_errors(recipe_file, tmp_path, monkeypatch, name, content, message):
    data = tmp_path / name
    data.write_bytes(content)
    line = _one_line_error(_train_args(recipe_file(), "--set", f'data.dataset="{data}"'), monkeypatch)
    assert message in line


def test_bad_model_folders_are_one_line_errors(tmp_path, tokenizer):
    from distillkit.config import ModelConfig
    from distillkit.engine.models import load_model, load_tokenizer, save_model

    from .conftest import tiny_model

    good = tmp_path / "good"
    save_model(tiny_model(tokenizer), tokenizer, good)
    truncated, no_weights, no_tokenizer = (tmp_path / n for n in ("truncated", "no_weights", "no_tokenizer"))
    for folder in (truncated, no_weights, no_tokenizer):
        folder.mkdir()
        (folder / "config.json").write_text((good / "config.json").read_text())
    (truncated / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes()[:200])
    cases = [
        (lambda: load_model(ModelConfig(path=str(truncated)), tokenizer, "student"), "damaged or truncated"),
        (lambda: load_model(ModelConfig(path=str(no_weights)), tokenizer, "student"), "no file named model"),
        (lambda: load_tokenizer(str(no_tokenizer)), "has no tokenizer files"),
        (lambda: load_model(ModelConfig(path=str(tmp_path / "absent")), tokenizer, "student"),
         "does not exist; check 'student.path' (a local path, not a hub id)"),
    ]
    for load, message in cases:
        with pytest.raises(DistillkitError, match=re.escape(message)) as err:
            load()
        assert "\n" not in str(err.value)


def test_bad_eval_arguments_are_one_line_errors(tmp_path, tokenizer, monkeypatch):
    from distillkit.engine.models import save_model

    from .conftest import tiny_model

    save_model(tiny_model(tokenizer), tokenizer, tmp_path / "model")
    base = ["eval", "--model", str(tmp_path / "model"), "--data"]
    assert "--limit must be >= 0 (0: all), got -1" in _one_line_error([*base, "dolly", "--limit", "-1"], monkeypatch)
    line = _one_line_error([*base, "dollly"], monkeypatch)
    assert "unknown test set 'dollly' (did you mean 'dolly'?); registered: " in line and "selfinst" in line


# --- property: malformed input never gets past assembly (issue 13, item 5) ---------

GOOD_ROW = b'{"instruction": "Name a colour.", "input": "", "output": "Red."}'
BAD_LINES = st.sampled_from([
    b'{"instruction": "a", "output": ', b"[1, 2]", b'"just a string"', b"\xff\xfe\x00garbage", b"{'single': 1}",
    b'{"instruction": 3, "output": "b"}', b'{"output": "no instruction"}', b"nul\x00l", b"42",
])


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(before=st.lists(st.just(GOOD_ROW), max_size=3), bad=BAD_LINES, after=st.lists(st.just(GOOD_ROW), max_size=3))
def test_malformed_jsonl_is_one_line_and_touches_nothing(recipe_file, tmp_path, monkeypatch, before, bad, after):
    data, output = tmp_path / "train.jsonl", tmp_path / "out"
    data.write_bytes(b"\n".join([*before, bad, *after]) + b"\n")
    output.mkdir(exist_ok=True)
    (output / "notes.txt").write_text("mine")
    snapshot = _snapshot(output)
    _one_line_error(_train_args(recipe_file(), "--output", str(output), "--set", f'data.dataset="{data}"'),
                    monkeypatch)
    assert _snapshot(output) == snapshot


RECIPE_NOISE = st.one_of(
    st.binary(min_size=1, max_size=40).map(lambda b: b"\xff" + b),  # not UTF-8
    st.text(alphabet="[]=\"'{}.,# abc\n", min_size=1, max_size=40).map(lambda t: ("[[" + t).encode()),  # not TOML
    st.tuples(st.sampled_from(["training", "data", "generation", "eval", "methods.kd"]),
              st.text(alphabet="abcdefghij_", min_size=1, max_size=8))
    .map(lambda kv: f"[{kv[0]}]\nzz_{kv[1]} = 1\n".encode()),  # unknown key
    st.sampled_from(["batch_size", "lr", "micro_batch_size", "max_steps", "log_every"])
    .map(lambda key: f'[training]\n{key} = "many"\n'.encode()),  # wrong type
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(noise=RECIPE_NOISE)
def test_malformed_recipes_are_one_line_and_touch_nothing(recipe_file, tmp_path, monkeypatch, noise):
    recipe, output = tmp_path / "broken.toml", tmp_path / "out"
    recipe.write_bytes(recipe_file().read_bytes() + b"\n" + noise)
    output.mkdir(exist_ok=True)
    (output / "notes.txt").write_text("mine")
    snapshot = _snapshot(output)
    _one_line_error(_train_args(recipe, "--output", str(output)), monkeypatch)
    assert _snapshot(output) == snapshot
