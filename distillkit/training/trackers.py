"""A run's experiment trackers (``[logging] report_to``), through
accelerate's tracker API only: the Accelerator logs with them
(:func:`~distillkit.training.accelerator.make_accelerator`); :class:`Trackers`
starts their run with the resolved recipe as hyper-parameters, logs the
records of ``metrics.jsonl``, the sampled validation responses and the cost at
the end, and ends it.  Only the main process logs (accelerate keeps the
trackers there); a resumed run logs from its resumed step.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from distillkit.config import RunConfig
from distillkit.config.run_folder import TRACKERS, run_settings
from distillkit.training.validation import ValidationSample

MLFLOW_URI = "MLFLOW_TRACKING_URI"
SAMPLES = "val/samples"  # the name of the sampled validation responses' table (or text)
COLUMNS = ["prompt", "response", "reference"]


def tracker_dir(output_dir: Path) -> Path:
    """Where the trackers of the run in ``output_dir`` write their files."""
    return output_dir / TRACKERS


def hyperparameters(config: RunConfig) -> dict[str, bool | int | float | str]:
    """The resolved recipe as flat dotted keys (``training.lr``, the method's
    ``options.NAME``; other methods' sections left out), each value a
    scalar or a string (lists, tables and None as text, as TensorBoard's
    hparams need)."""
    settings = run_settings(config)
    recipe = {key: value for key, value in settings["recipe"].items() if key != "methods"}
    flat: dict[str, bool | int | float | str] = {}

    def add(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for key, item in value.items():
                add(f"{prefix}.{key}", item)
        else:
            flat[prefix] = value if isinstance(value, (bool, int, float, str)) else str(value)

    for key, value in {**recipe, "training": settings["training"], "method": config.method,
                       "options": settings["options"]}.items():
        add(key, value)
    return flat


def _markdown(samples: list[ValidationSample]) -> str:
    """``samples`` as a markdown table (TensorBoard renders text as markdown)."""
    def cell(text: str) -> str:
        return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", "<br>")

    rows = [f"| {cell(s.prompt)} | {cell(s.response)} | {cell(s.reference)} |" for s in samples]
    return "\n".join(["| " + " | ".join(COLUMNS) + " |", "|---|---|---|", *rows])


class Trackers:
    """The trackers of one run (none when ``report_to`` is empty: every call does nothing)."""

    def __init__(self, accelerator: Accelerator, config: RunConfig, output_dir: Path) -> None:
        self.accelerator, self.config, self.folder = accelerator, config, tracker_dir(output_dir)
        self.names = config.recipe.logging.report_to

    @contextlib.contextmanager
    def running(self, step: int) -> Iterator[None]:
        """Start the trackers' run at optimizer step ``step`` (0, or the
        resumed one) and end it on leaving, also on an error, so that their
        files are flushed.  MLflow without ``MLFLOW_TRACKING_URI`` uses
        ``trackers/mlflow.db`` meanwhile.  Ending calls
        ``accelerator.end_training()``, which also ends the process group."""
        if not self.names:
            yield
            return
        section = self.config.recipe.logging
        local_store = "mlflow" in self.names and MLFLOW_URI not in os.environ
        if self.accelerator.is_main_process:
            self.folder.mkdir(parents=True, exist_ok=True)
        if local_store:
            os.environ[MLFLOW_URI] = f"sqlite:///{(self.folder / 'mlflow.db').resolve()}"
        run_name = section.run_name or self.config.method
        init_kwargs: dict[str, dict[str, Any]] = {
            "mlflow": {"run_name": run_name, "logging_dir": str(self.folder / "mlflow-artifacts")},
            "wandb": {"name": run_name, "dir": str(self.folder)},
            "trackio": {"name": run_name},
        }
        if step:  # TensorBoard hides the events of the steps a resumed run redoes
            init_kwargs["tensorboard"] = {"purge_step": step + 1}
        try:
            self.accelerator.init_trackers(section.project or self.config.recipe.name,
                                           config=hyperparameters(self.config), init_kwargs=init_kwargs)
            yield
        finally:
            self.accelerator.end_training()
            if local_store:
                del os.environ[MLFLOW_URI]

    def log(self, record: dict[str, Any]) -> None:
        """One record (with its ``"step"``), its values as numbers."""
        if self.names:
            self.accelerator.log({key: float(value) for key, value in record.items() if key != "step"},
                                 step=record["step"])

    def log_samples(self, samples: list[ValidationSample], step: int) -> None:
        """Sampled validation responses at ``step``: a table for trackers that
        have one, markdown text on TensorBoard, nothing on the others."""
        data = [[s.prompt, s.response, s.reference] for s in samples]
        for tracker in self.accelerator.trackers:
            if hasattr(tracker, "log_table"):
                tracker.log_table(SAMPLES, columns=COLUMNS, data=data, step=step)
            elif tracker.name == "tensorboard":
                tracker.log({SAMPLES: _markdown(samples)}, step=step)
