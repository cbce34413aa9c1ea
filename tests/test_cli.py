"""The command line: the exact commands scripts rely on, and their errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from distillkit.cli import app
from distillkit.engine.models import save_model

from .conftest import tiny_model

runner = CliRunner()


def test_methods_json_lists_builtins():
    result = runner.invoke(app, ["methods", "--json"])
    assert result.exit_code == 0
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert {"sft", "kd"} <= set(rows)
    assert rows["kd"]["plugin"] == "distillkit:kd" and rows["kd"]["description"]


def _cli_at_width(columns: int, *args: str) -> str:
    """The command's output on a terminal ``columns`` wide (rich reads COLUMNS when the CLI module loads)."""
    env = {**os.environ, "COLUMNS": str(columns)}
    result = subprocess.run([sys.executable, "-m", "distillkit", *args], env=env, capture_output=True, text=True,
                            check=True)
    return result.stdout


def test_the_methods_table_fits_an_80_column_terminal_without_cutting_names():
    text = _cli_at_width(80, "methods")
    assert max(len(line) for line in text.splitlines()) <= 80
    rows = json.loads(runner.invoke(app, ["methods", "--json"]).stdout)
    for row in rows:  # every method and plugin name in full; the description wraps in a wide column
        assert any(row["name"] in line and row["plugin"] in line for line in text.splitlines()), row["plugin"]
    assert "reverse KL on dataset" in " ".join(" ".join(line.split()) for line in text.splitlines())


def test_help_reflows_docstrings_to_the_terminal_width():
    lines = _cli_at_width(120, "--help").splitlines()
    # the docstrings break after "± std" and "test sets,"; at 120 columns each sentence continues on its line
    assert any("with mean ± std over seeds" in line for line in lines)
    assert any("on the test sets, and write" in line for line in lines)


def test_recipes_json_lists_tiny():
    result = runner.invoke(app, ["recipes", "--json"])
    assert result.exit_code == 0
    assert "tiny" in {row["name"] for row in json.loads(result.stdout)}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "promptk", "--recipe", "tiny"], "unknown method 'promptk'"),
        (["--method", "kd", "--recipe", "tyni"], "unknown recipe 'tyni' (did you mean 'tiny'?)"),
        (["--method", "kd", "--recipe", "tiny", "--set", "training.lrr=1"], "did you mean 'lr'?"),
        (["--method", "kd", "--recipe", "tiny", "--set", "~teacher.confg"],
         "--set ~teacher.confg: the recipe sets no 'teacher.confg' (did you mean 'config'?)"),
    ],
)
def test_train_errors_are_one_line(args, message):
    result = runner.invoke(app, ["train", *args])
    assert result.exit_code == 2
    assert message in result.stderr.replace("\n", " ")
    assert "Traceback" not in result.stderr


def test_eval_prints_rouge_per_seed_and_mean(tmp_path, tokenizer):
    save_model(tiny_model(tokenizer, seed=1), tokenizer, tmp_path / "model")
    out_file = tmp_path / "scores.json"
    result = runner.invoke(app, ["eval", "--model", str(tmp_path / "model"), "--data", "dolly", "--seeds", "10,20",
                                 "--limit", "4", "--output", str(out_file), "--batch-size", "4"])
    assert result.exit_code == 0, result.stderr
    assert "mean ± std" in result.stdout
    scores = json.loads(out_file.read_text())
    assert scores["examples"] == 4 and set(scores["rougeL"]) == {"10", "20"}
    assert scores["mean"] == pytest.approx(sum(scores["rougeL"].values()) / 2)


def test_eval_errors(tmp_path):
    result = runner.invoke(app, ["eval", "--model", str(tmp_path), "--data", "dolly"])
    assert result.exit_code == 2 and "holds no model" in result.stderr
    result = runner.invoke(app, ["eval", "--model", str(tmp_path), "--data", "dolly", "--seeds", "a,b"])
    assert result.exit_code == 2 and "--seeds expects comma-separated integers" in result.stderr
    # a subset is checked before the (here absent) model is loaded
    result = runner.invoke(app, ["eval", "--model", str(tmp_path), "--data", "dolly", "--subset", "sni=5"])
    assert result.exit_code == 2 and "--subset sni=5 names a set that is not evaluated; evaluated: dolly" in result.stderr
    result = runner.invoke(app, ["eval", "--model", str(tmp_path), "--data", "dolly", "--subset", "dolly=0"])
    assert result.exit_code == 2 and "--subset dolly=0: the size must be >= 1" in result.stderr


def test_a_deprecated_call_from_distillkit_stops_the_command_and_one_inside_a_dependency_does_not():
    import warnings

    from distillkit.cli import _setup_logging

    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()  # the filters a command starts from, not the test suite's
        _setup_logging()
        for category in (DeprecationWarning, FutureWarning):
            with pytest.raises(category):
                warnings.warn_explicit("old API", category, "sampling.py", 1, module="distillkit.engine.sampling")
            warnings.warn_explicit("old API", category, "modeling_utils.py", 1, module="transformers.modeling_utils")
    assert [w.category for w in caught] == [DeprecationWarning, FutureWarning]
