"""`distillkit bench`: the dry-run plan, tables, and an end-to-end resumable
bench of two methods on the tiny test recipe (the memory planner itself:
test_planning.py)."""

from __future__ import annotations

import dataclasses
import json

import pytest
from rich.console import Console
from typer.testing import CliRunner

from distillkit import bench
from distillkit.bench import BenchConfig, Results, quality_markdown, quality_rows, run_bench
from distillkit.cli import app
from distillkit.errors import DistillkitError
from distillkit.registry import registry


def _results(tmp_path) -> Results:
    results = Results(tmp_path / "results.json")
    results.data["eval"] = {
        "teacher": {"dolly": {"mean": 9.0, "std": 0.1}, "unni": {"missing": "not available"}},
        "sft": {"dolly": {"mean": 5.0, "std": 0.2}, "unni": {"missing": "not available"}},
        "kd": {"dolly": {"mean": 6.0, "std": 0.3}, "unni": {"missing": "not available"}},
    }
    return results


def test_quality_table_marks_the_best_student_and_missing_sets(tmp_path):
    rows = quality_rows(_results(tmp_path), ["teacher", "sft", "kd"], ["dolly", "unni"])
    text = quality_markdown(rows, ["dolly", "unni"], {"unni": "not available"})
    lines = text.splitlines()
    assert lines[0] == "| model | dolly | unni | average |"
    assert lines[2] == "| teacher | 9.00 ± 0.10 | missing | 9.00 |"  # the teacher is not a candidate for best
    assert lines[3] == "| sft | 5.00 ± 0.20 | missing | 5.00 |"
    assert lines[4] == "| kd | **6.00 ± 0.30** | missing | **6.00** |"
    assert "- average: over dolly" in text and "- unni: missing (not available)" in text
    rows = quality_rows(_results(tmp_path), ["teacher", "sft", "kd", "gkd"], ["dolly", "unni"])
    assert rows[3]["average"] is None  # gkd not evaluated yet


def test_unknown_names_fail_before_any_work(tmp_path, recipe_file):
    config = BenchConfig(str(recipe_file()), ["sft", "kdd"], ["dolly"], [10], tmp_path / "b")
    with pytest.raises(DistillkitError, match="kdd.*did you mean 'kd'"):
        run_bench(config, Console(quiet=True))
    config = BenchConfig(str(recipe_file()), ["sft"], ["dolyl"], [10], tmp_path / "b")
    with pytest.raises(DistillkitError, match="unknown test set 'dolyl'.*did you mean 'dolly'"):
        run_bench(config, Console(quiet=True))
    assert not (tmp_path / "b").exists()


def test_dry_run_prints_the_plan_and_whether_it_fits(recipe_file):
    result = CliRunner().invoke(app, ["bench", "--recipe", str(recipe_file()), "--methods", "sft,kd",
                                      "--data", "dolly", "--dry-run"])
    assert result.exit_code == 0, result.output
    for text in ("train sft", "train kd", "eval teacher", "memory estimate", "fits"):
        assert text in result.output


def test_bench_compares_every_registered_method_by_default(recipe_file):
    result = CliRunner().invoke(app, ["bench", "--recipe", str(recipe_file()), "--data", "dolly", "--dry-run"])
    assert result.exit_code == 0, result.output
    trained = {line.split()[2] for line in result.output.splitlines() if line.split()[1:2] == ["train"]}
    assert trained == set(registry().methods.names()) and len(trained) >= 12


def test_bench_trains_evaluates_writes_tables_and_resumes(recipe_file, tmp_path, monkeypatch):
    config = BenchConfig(str(recipe_file(steps=3, eval_every=3)), ["sft", "kd"], ["dolly", "unni"], [10],
                         tmp_path / "bench", limit=4)
    tables = run_bench(config, Console(quiet=True))
    for name in ("quality.md", "quality.csv", "cost.md", "cost.csv", "tables.json", "quality.png",
                 "quality_vs_cost.png", "curves.png", "answers.md", "sft/train.log", "kd/best/model.safetensors"):
        assert (config.output / name).is_file(), name
    assert [line.split(" |")[0] for line in tables["quality"].splitlines()[2:5]] == ["| teacher", "| sft", "| kd"]
    # the answers shown side by side are the evaluated responses to the set's first prompts, at the first seed
    samples = json.loads((config.output / "results.json").read_text())["eval"]["kd"]["dolly"]["samples"]
    assert len(samples) == 3 and set(samples[0]["responses"]) == {"10"}
    answers = tables["answers"]
    assert answers.count("### dolly test prompt") == 3 and "| reference |" in answers
    kd_answer = " ".join(samples[0]["responses"]["10"].split()).replace("|", "\\|") or "(empty)"
    assert f"| kd | {kd_answer} |" in answers and "| teacher |" in answers and "| sft |" in answers
    # the curves come from each run's metrics.jsonl: the training loss at every logged step, validation at the end
    curve = json.loads((config.output / "results.json").read_text())["train"]["kd"]["curve"]
    assert [point["step"] for point in curve if "loss" in point] == [1, 2, 3]
    assert [point["step"] for point in curve if "val/rougeL" in point] == [3]
    cost = {row["method"]: row for row in json.loads((config.output / "tables.json").read_text())["cost"]}
    assert cost["sft"]["steps"] == cost["kd"]["steps"] == 3
    assert cost["kd"]["peak_memory_mb"] > 0 and cost["kd"]["train_s"] > 0
    assert cost["sft"]["trainable_parameters"] == cost["kd"]["trainable_parameters"] > 0
    results = json.loads((config.output / "results.json").read_text())
    assert "missing" in results["eval"]["kd"]["unni"] and results["eval"]["kd"]["dolly"]["examples"] == 4

    calls = []
    monkeypatch.setattr(bench, "train_method", lambda *a: calls.append("train"))
    import distillkit.evaluation.protocol as evaluation

    original = evaluation.evaluate_sets

    def counting(folder, sets, **kwargs):
        calls.append((folder.name, tuple(sets)))
        return original(folder, sets, **kwargs)

    monkeypatch.setattr(evaluation, "evaluate_sets", counting)
    assert run_bench(config, Console(quiet=True)) == tables  # everything done before: nothing runs
    assert calls == []
    del results["eval"]["kd"]["dolly"]  # as if killed while evaluating kd on dolly
    (config.output / "results.json").write_text(json.dumps(results))
    run_bench(config, Console(quiet=True))
    assert calls == [("kd", ("dolly",))]


def test_a_bench_copied_to_a_fresh_folder_keeps_its_finished_rows(recipe_file, tmp_path, monkeypatch):
    """results.json alone (the run folders left behind, e.g. on another machine): finished rows are kept,
    a method trained but not evaluated on every set is trained again and evaluated on all of them, and the
    teacher is not evaluated again."""
    config = BenchConfig(str(recipe_file(steps=2, eval_every=2)), ["sft", "kd"], ["dolly", "vicuna-raw"], [10],
                         tmp_path / "bench", limit=3)
    run_bench(config, Console(quiet=True))
    results = json.loads((config.output / "results.json").read_text())
    del results["eval"]["kd"]["vicuna-raw"]  # killed after evaluating kd on dolly, before vicuna-raw
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "results.json").write_text(json.dumps(results))
    trained, evaluated = [], []
    original_train = bench.train_method
    monkeypatch.setattr(bench, "train_method", lambda cfg, method: trained.append(method) or original_train(cfg, method))
    import distillkit.evaluation.protocol as evaluation

    original_eval_sets = evaluation.evaluate_sets
    monkeypatch.setattr(evaluation, "evaluate_sets", lambda folder, sets, **kw: evaluated.append(
        (folder.name, tuple(sets))) or original_eval_sets(folder, sets, **kw))
    run_bench(dataclasses.replace(config, output=fresh), Console(quiet=True))
    assert trained == ["kd"] and evaluated == [("kd", ("dolly", "vicuna-raw"))]  # the new weights on every set
    tables = json.loads((fresh / "tables.json").read_text())
    assert [row["model"] for row in tables["quality"]] == ["teacher", "sft", "kd"]


def test_a_row_trained_with_other_settings_is_trained_again(recipe_file, tmp_path, monkeypatch):
    """A row records its run's settings. After a change in what one method reads, that method alone is
    trained and evaluated again; its old run folder, left in the bench folder, is refused first, with the fix."""
    config = BenchConfig(str(recipe_file(steps=2, eval_every=2)), ["sft", "kd"], ["dolly"], [10], tmp_path / "bench",
                         limit=2)
    run_bench(config, Console(quiet=True))
    changed = dataclasses.replace(config, overrides=["methods.kd.kd_ratio=0.3"])
    with pytest.raises(DistillkitError, match=r"holds a kd run with other settings \(options.kd_ratio is 0.5 there, "
                                              r"0.3 now \(and 1 more\)\); move it away to train kd again"):
        run_bench(changed, Console(quiet=True))
    (config.output / "kd").rename(tmp_path / "old-kd")
    trained = []
    original_train = bench.train_method
    monkeypatch.setattr(bench, "train_method", lambda cfg, method: trained.append(method) or original_train(cfg, method))
    run_bench(changed, Console(quiet=True))
    assert trained == ["kd"]  # the sft row reads no kd section: kept
    row = json.loads((config.output / "results.json").read_text())["train"]["kd"]
    assert row["settings"]["options"]["kd_ratio"] == 0.3
    run_bench(changed, Console(quiet=True))  # the same settings again: nothing to do
    results = json.loads((config.output / "results.json").read_text())
    del results["train"]["sft"]["settings"]  # a row recorded before rows kept their settings: kept, unchecked
    (config.output / "results.json").write_text(json.dumps(results))
    run_bench(changed, Console(quiet=True))
    assert trained == ["kd"]


def test_a_teacher_without_sft_is_scored_from_its_folder_with_the_bench_settings(recipe_file, tmp_path):
    """No [teacher.sft] (as in the smollm2 recipe): the run links the folder the teacher loads from, and the
    bench scores it with its own recipe's lengths and sampling (that folder holds no run to read them from)."""
    from distillkit.config import load_recipe
    from distillkit.data.prepare import recipe_tokenizer
    from distillkit.engine.models import save_model

    from .conftest import tiny_model

    recipe = str(recipe_file(steps=2, eval_every=2))
    shared, _ = recipe_tokenizer(load_recipe(recipe))  # the recipe's own (trained) tokenizer
    folder = tmp_path / "teacher-model"
    save_model(tiny_model(shared, seed=5), shared, folder)
    config = BenchConfig(recipe, ["kd"], ["dolly"], [10], tmp_path / "bench", limit=2,
                         overrides=["~teacher.config", "~teacher.sft", f'teacher.path="{folder}"'])
    run_bench(config, Console(quiet=True))
    assert (config.output / "kd" / "teacher").resolve() == folder.resolve()
    report = json.loads((config.output / "results.json").read_text())["eval"]["teacher"]["dolly"]
    assert report["examples"] == 2 and report["model"] == str(folder)
    assert 0 < report["generated_tokens"] <= 2 * 8  # the test recipe's max_new_tokens = 8, not the defaults'


def test_a_subset_names_an_evaluated_set_and_a_report_of_another_selection_is_redone(recipe_file, tmp_path,
                                                                                      monkeypatch):
    config = BenchConfig(str(recipe_file()), ["sft"], ["dolly"], [10], tmp_path / "b", subsets={"sni": 10})
    with pytest.raises(DistillkitError, match="--subset sni=10 names a set that is not evaluated"):
        run_bench(config, Console(quiet=True))
    config = BenchConfig(str(recipe_file(steps=2, eval_every=2)), ["sft"], ["dolly", "vicuna-raw"], [10],
                         tmp_path / "bench", subsets={"vicuna-raw": 3}, limit=2)
    results = Results(config.output / "results.json")
    whole = {"examples": 2, "limit": 2, "mean": 1.0, "std": 0.0}  # an earlier bench evaluated all of vicuna-raw
    results.data["eval"] = {"teacher": {"dolly": dict(whole), "vicuna-raw": dict(whole)},
                            "sft": {"dolly": dict(whole), "vicuna-raw": dict(whole)}}
    results.data["train"] = {"sft": {"steps": 2, "train_s": 1.0}}
    config.output.mkdir(parents=True)
    results.save()
    (config.output / "sft" / "best").mkdir(parents=True)  # trained before
    evaluated = []
    monkeypatch.setattr(bench, "train_method", lambda *a: pytest.fail("sft was trained before"))
    monkeypatch.setattr(bench, "teacher_dir", lambda cfg: tmp_path / "teacher")
    import distillkit.evaluation.protocol as evaluation

    def fake(folder, sets, **kwargs):
        evaluated.append((folder.name, tuple(sets), kwargs["subsets"]))
        return {name: {**whole, "examples": 2, "subset": {"size": 3, "of": 80, "seed": 0}} for name in sets}
    monkeypatch.setattr(evaluation, "evaluate_sets", fake)
    tables = run_bench(config, Console(quiet=True))
    assert evaluated == [("teacher", ("vicuna-raw",), {"vicuna-raw": 3}), ("sft", ("vicuna-raw",), {"vicuna-raw": 3})]
    assert "- vicuna-raw: a fixed random subset of 2 of its 80 examples (seed 0, the same for every model)" \
        in tables["quality"]
    assert "- every set: its first 2 examples" in tables["quality"]
    assert json.loads((config.output / "tables.json").read_text())["subsets"] == {"vicuna-raw": 3}


def test_a_terminated_bench_stops_its_training_child(tmp_path):
    """SIGTERM to the bench (``kill``) ends the child it is waiting on, so no training outlives it."""
    import os
    import signal
    import subprocess
    import sys
    import time

    pid_file = tmp_path / "child.pid"
    child = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    parent = subprocess.Popen([sys.executable, "-c", "import sys; from distillkit.bench import run_child; "
                               f"run_child([sys.executable, '-c', {child!r}])"])
    for _ in range(300):
        if pid_file.is_file() and pid_file.read_text():
            break
        time.sleep(0.05)
    child_pid = int(pid_file.read_text())
    parent.send_signal(signal.SIGTERM)
    assert parent.wait(timeout=30) == 128 + signal.SIGTERM
    with pytest.raises(ProcessLookupError):  # the child has ended and been reaped
        os.kill(child_pid, 0)
