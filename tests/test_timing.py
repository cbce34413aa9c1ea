"""`distillkit bench --dry-run --time-steps N`: the measured time estimate
(distillkit/planning/timing.py) on the tiny test recipe."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from rich.console import Console
from typer.testing import CliRunner

from distillkit.cli import app
from distillkit.config import load_recipe, resolve_run
from distillkit.planning.timing import estimate_time
from distillkit.training.batches import total_steps
from distillkit.training.pipeline import open_session, preparation


def _cache_folders() -> set[str]:
    root = Path(os.environ["DISTILLKIT_CACHE_DIR"])
    return {str(p.relative_to(root)) for p in root.rglob("*")} if root.is_dir() else set()


def test_the_estimate_times_each_method_and_the_preparations_and_adds_up(recipe_file, tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILLKIT_CACHE_DIR", str(tmp_path / "cache"))  # its marked-done teacher stays its own
    recipe = load_recipe(str(recipe_file(steps=4, eval_every=2)))
    console = Console(quiet=True)
    teacher_prep = preparation(open_session(recipe, console), "teacher")
    teacher_prep.folder.mkdir(parents=True)
    (teacher_prep.folder / "DONE").write_text("complete\n")  # the teacher's SFT is cached; the student's is not
    before = _cache_folders()
    methods = ["sft", "seqkd", "abkd"]  # no teacher; a teacher generation at setup; the SFT student init
    estimate = estimate_time(recipe, methods, sets=["dolly", "unni"], seeds=[10, 20], limit=6, subsets={},
                             time_steps=1, console=console)
    assert _cache_folders() == before  # the timed runs' caches (SeqKD's generations) went to a scratch folder
    json.dumps(estimate)  # JSON-ready
    assert set(estimate["missing"]) == {"unni"}
    assert set(estimate["rates"]["seconds_per_prompt"]["student"]) == {"dolly", "validation"}
    rows = estimate["methods"]
    for method, row in rows.items():
        assert row["steps"] == total_steps(resolve_run(recipe, method).training, estimate["train_examples"]) == 4
        assert row["validations"] == 2  # steps 2 and 4
        for key in ("seconds_per_step", "train_s", "setup_s", "validation_s", "eval_s", "total_s"):
            assert math.isfinite(row[key]) and row[key] > 0, (method, key, row[key])
        assert math.isclose(row["total_s"], row["train_s"] + row["setup_s"] + row["validation_s"] + row["eval_s"])
        assert math.isclose(row["train_s"], row["steps"] * row["seconds_per_step"])
    assert rows["seqkd"]["setup_s"] > rows["sft"]["setup_s"]  # its teacher generation, x 96 / 16 examples
    assert estimate["preparations"]["teacher"] == {"cached": True, "folder": str(teacher_prep.folder), "total_s": 0.0}
    student_prep = estimate["preparations"]["student"]
    assert not student_prep["cached"] and student_prep["steps"] == 4  # [training] max_steps, as no [student.sft]
    assert student_prep["validations"] == 2 and student_prep["eval_s"] == 0
    assert math.isclose(student_prep["total_s"], student_prep["train_s"] + student_prep["setup_s"]
                        + student_prep["validation_s"]) and student_prep["validation_s"] > 0
    assert estimate["teacher_eval_s"] > 0
    parts = sum(r["total_s"] for r in rows.values()) + student_prep["total_s"] + estimate["teacher_eval_s"]
    assert math.isclose(estimate["total_s"], parts)


def test_the_dry_run_prints_the_estimate_and_writes_it(recipe_file, tmp_path):
    output = tmp_path / "bench"
    result = CliRunner().invoke(app, ["bench", "--recipe", str(recipe_file()), "--methods", "sft", "--data", "dolly",
                                      "--limit", "4", "--output", str(output), "--dry-run", "--time-steps", "1"])
    assert result.exit_code == 0, result.output
    assert "memory estimate" in result.output and "time estimate" in result.output
    assert "measured rates" in result.output and "estimate.json" in result.output
    estimate = json.loads((output / "estimate.json").read_text())
    assert list(estimate["methods"]) == ["sft"] and estimate["time_steps"] == 1
    assert estimate["preparations"] == {} and estimate["teacher_eval_s"] is None  # no method needs a teacher


def test_time_steps_needs_a_dry_run_and_a_count(recipe_file, tmp_path):
    base = ["bench", "--recipe", str(recipe_file()), "--methods", "sft", "--output", str(tmp_path / "b")]
    result = CliRunner().invoke(app, [*base, "--time-steps", "2"])
    assert result.exit_code == 2 and "--time-steps measures for a dry run only; add --dry-run" in result.output
    result = CliRunner().invoke(app, [*base, "--dry-run", "--time-steps", "-1"])
    assert result.exit_code == 2 and "--time-steps must be >= 0 (0: no timing), got -1" in result.output
    assert not (tmp_path / "b").exists()
