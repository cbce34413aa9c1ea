"""Experiment trackers (``[logging] report_to``): a tiny run logged to real
TensorBoard event files and a real MLflow SQLite store, read back with their
own readers and compared with ``metrics.jsonl``; a killed and resumed run logs
each step once; unknown or uninstalled trackers fail before any model loads;
the bench names one project and a run per method."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from typer.testing import CliRunner

from distillkit.bench import BenchConfig, train_command
from distillkit.cli import _overrides, app
from distillkit.config import load_recipe
from distillkit.errors import DistillkitError
from distillkit.training import pipeline
from distillkit.training.pipeline import train

from .conftest import train_killed_during_step

TRACKED = ['logging.report_to=["tensorboard", "mlflow"]', "training.progress_bar=false"]


@pytest.fixture(autouse=True)
def _local_mlflow_store(monkeypatch):
    """Runs use their own ``trackers/mlflow.db`` (no tracking server from the environment)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _tensorboard(run: Path, project: str) -> EventAccumulator:
    events = EventAccumulator(str(run / "trackers" / project), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return events


def _mlflow(run: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{run / 'trackers' / 'mlflow.db'}")


def _logged(records: list[dict], key: str) -> list[tuple[int, float]]:
    return [(r["step"], float(r[key])) for r in records if key in r]


def test_a_tracked_run_logs_what_metrics_jsonl_records(recipe_file, tmp_path):
    run = tmp_path / "run"
    train("sft", str(recipe_file(steps=3, eval_every=2)), output=run, overrides=TRACKED)
    assert "MLFLOW_TRACKING_URI" not in os.environ  # the run's local store is not left set
    records = _records(run)
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]

    events = _tensorboard(run, "test-tiny")  # project: the recipe's name
    for key in ("loss", "lr/student", "grad_norm/student", "tokens_per_s", "val/rougeL", "val/loss"):
        logged = [(e.step, e.value) for e in events.Scalars(key)]
        assert logged == [(step, pytest.approx(value, rel=1e-6)) for step, value in _logged(records, key)], key
    assert [e.step for e in events.Scalars("cost/train_s")] == [3]
    samples = events.Tensors("val/samples/text_summary")  # TensorBoard has no tables: markdown text
    assert [s.step for s in samples] == [2, 3]
    table = samples[0].tensor_proto.string_val[0].decode().splitlines()
    assert table[0] == "| prompt | response | reference |" and len(table) == 2 + 6  # eval_limit = 6 responses

    client = _mlflow(run)
    (mlflow_run,) = client.search_runs([client.get_experiment_by_name("test-tiny").experiment_id])
    assert mlflow_run.info.run_name == "sft" and mlflow_run.info.status == "FINISHED"
    params = mlflow_run.data.params
    assert (params["method"], params["training.lr"], params["data.dataset"]) == ("sft", "0.01", "dolly")
    assert params["training.adam_betas"] == "[0.9, 0.999]" and params["eval.max_new_tokens"] == "None"
    for key in ("loss", "val/rougeL", "val/loss", "lr/student"):
        history = [(m.step, m.value) for m in client.get_metric_history(mlflow_run.info.run_id, key)]
        assert history == [(step, pytest.approx(value, rel=1e-12)) for step, value in _logged(records, key)], key
    cost = mlflow_run.data.metrics
    assert cost["cost/trainable_parameters"] > 0 and cost["cost/train_s"] > 0 and cost["cost/generated_tokens"] == 0


def test_a_killed_run_resumed_from_an_old_folder_logs_each_step_once(recipe_file, tmp_path, monkeypatch):
    """Killed during step 4 after logging step 3 (checkpoint at 2): the trackers
    are ended (files flushed); the resumed run, in a folder whose run.json has
    no [logging] (made before it existed), logs from step 3 on and
    TensorBoard shows each step once, with the values of metrics.jsonl."""
    recipe, run = str(recipe_file(steps=4, eval_every=2)), tmp_path / "run"
    train_killed_during_step(monkeypatch, 4, lambda: train("sft", recipe, output=run, overrides=TRACKED))
    client = _mlflow(run)
    experiment = client.get_experiment_by_name("test-tiny").experiment_id
    (killed,) = client.search_runs([experiment])
    assert killed.info.status == "FINISHED"  # ended although the run died
    assert [m.step for m in client.get_metric_history(killed.info.run_id, "loss")] == [1, 2, 3]

    manifest = json.loads((run / "run.json").read_text())
    del manifest["recipe"]["logging"]
    (run / "run.json").write_text(json.dumps(manifest))
    train("sft", recipe, output=run, overrides=TRACKED, resume=True)

    records = _records(run)
    logged = [(e.step, e.value) for e in _tensorboard(run, "test-tiny").Scalars("loss")]
    assert logged == [(step, pytest.approx(value, rel=1e-6)) for step, value in _logged(records, "loss")]
    assert [step for step, _ in logged] == [1, 2, 3, 4]
    (resumed,) = [r for r in client.search_runs([experiment]) if r.info.run_id != killed.info.run_id]
    assert [m.step for m in client.get_metric_history(resumed.info.run_id, "loss")] == [3, 4]


@pytest.fixture
def no_model_loads(monkeypatch):
    """Loading data or a model fails the test: the errors must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model or data was loaded before the error")

    monkeypatch.setattr(pipeline, "open_session", refuse)
    monkeypatch.setattr(pipeline, "load_model", refuse)


def test_unknown_or_uninstalled_trackers_are_one_line_errors_before_any_model_loads(recipe_file, tmp_path,
                                                                                    monkeypatch, no_model_loads):
    recipe = str(recipe_file())
    with pytest.raises(DistillkitError, match=r"unknown tracker 'tensorbord' \(did you mean 'tensorboard'\?\); "
                                              r"known trackers: .*mlflow.*wandb") as error:
        train("sft", recipe, output=tmp_path / "a", overrides=['logging.report_to=["tensorbord"]'])
    assert "\n" not in str(error.value)

    import distillkit.config.trackers as trackers

    monkeypatch.setattr(trackers, "tracker_available", lambda name: name == "tensorboard")
    with pytest.raises(DistillkitError, match=r"'mlflow', whose package is not installed here; "
                                              r"pip install 'distillkit\[trackers\]'") as error:
        train("sft", recipe, output=tmp_path / "a", overrides=TRACKED)
    assert "\n" not in str(error.value)
    with pytest.raises(DistillkitError, match="'wandb', whose package is not installed here; pip install wandb,"):
        train("sft", recipe, output=tmp_path / "a", overrides=['logging.report_to=["wandb"]'])
    assert not (tmp_path / "a").exists()

    result = CliRunner().invoke(app, ["train", "--method", "sft", "--recipe", recipe, "--report-to", "tensorbord"])
    assert result.exit_code == 2 and "unknown tracker 'tensorbord'" in result.output


def test_report_to_is_the_same_as_setting_logging_report_to(recipe_file):
    overrides = _overrides(["training.lr=0.1"], "tensorboard, mlflow")
    assert overrides == ["training.lr=0.1", 'logging.report_to=["tensorboard", "mlflow"]']
    assert load_recipe(str(recipe_file()), overrides).logging.report_to == ["tensorboard", "mlflow"]
    assert _overrides(None, None) == []


def test_the_bench_names_one_project_and_a_run_per_method(recipe_file, tmp_path):
    config = BenchConfig(str(recipe_file()), ["sft", "kd"], ["dolly"], [10], tmp_path / "my-bench",
                         overrides=['logging.report_to=["tensorboard"]'])
    command = train_command(config, "kd")
    assert command[command.index("--output") + 1] == str(tmp_path / "my-bench" / "kd")
    sets = [command[i + 1] for i, arg in enumerate(command) if arg == "--set"]
    assert sets[-1] == 'logging.report_to=["tensorboard"]'  # the bench's overrides come last: they may rename
    logging = load_recipe(config.recipe, sets).logging
    assert (logging.project, logging.run_name, logging.report_to) == ("my-bench", "kd", ["tensorboard"])


def test_a_bench_logs_its_methods_into_one_mlflow_store(recipe_file, tmp_path):
    from rich.console import Console

    from distillkit.bench import run_bench

    config = BenchConfig(str(recipe_file(steps=2, eval_every=2)), ["sft"], ["dolly"], [10], tmp_path / "my-bench",
                         limit=2, overrides=['logging.report_to=["mlflow"]'])
    with pytest.raises(DistillkitError, match="no trained teacher"):  # SFT alone has no teacher to evaluate
        run_bench(config, Console(quiet=True))
    client = MlflowClient(f"sqlite:///{tmp_path / 'my-bench' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("my-bench").experiment_id])
    assert run.info.run_name == "sft" and [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2]
    assert not (tmp_path / "my-bench" / "sft" / "trackers" / "mlflow.db").exists()
