"""The run folder's format: what ``distillkit train`` writes into its
``--output`` folder, and the typed reading of it by evaluation, the bench
and ``--resume``::

    run.json                      RUN_FILE: method, resolved recipe, options, training settings,
                                  total_steps (K), trainable_parameters (per parameter group)
    metrics.jsonl                 METRICS_FILE: one JSON record per logged step or validation ("step": k)
    checkpoints/step-NNNNNNN/     a checkpoint; complete once it holds STATE_FILE
        trainer_state.json        STATE_FILE: the TrainerState
    checkpoints/step-NNNNNNN.tmp  a checkpoint being written (never read)
    best/                         the best student so far (a transformers model folder with
                                  generation_config.json), with BEST_FILE
        best.json                 its step, validation metrics and cost so far (TrainerState's fields)
        README.md                 its model card (distillkit.training.model_card)
        teacher_adapter/          the teacher adapter's own save (peft's format), when it trains one
    teacher                       a link to the prepared teacher, when the method has one
    trackers/                     TRACKERS: the experiment trackers' files ([logging] report_to)
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distillkit.config.schema import Recipe, TrainingConfig, build, to_dict
from distillkit.errors import DistillkitError
from distillkit.files import write_json_atomic, write_text_atomic

if TYPE_CHECKING:
    from distillkit.config.assembly import RunConfig

RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
BEST = "best"
BEST_FILE = "best.json"
CARD_FILE = "README.md"
# what a model folder says about its model, not what the model computes (eval cells are keyed without them)
RECORD_FILES = (BEST_FILE, CARD_FILE)
TRACKERS = "trackers"


@dataclass
class TrainerState:
    """Progress saved with every checkpoint."""

    step: int = 0
    best_metric: float | None = None
    best_step: int = -1
    tokens: int = 0  # tokens through the student (attention-mask positions)
    elapsed_s: float = 0.0  # seconds in training steps (no setup, evaluation or checkpointing)
    generated_tokens: int = 0  # tokens sampled by the run (pseudo-targets, all processes), see Run.sample
    peak_memory_mb: float = 0.0  # CUDA: peak allocated; CPU: peak resident set of the (main) process
    skipped_updates: int = 0  # stage updates skipped for a non-finite loss or gradient (on_nonfinite = "skip")


# --- checkpoints -------------------------------------------------------------


def checkpoint_folder(output_dir: Path, step: int) -> Path:
    """``checkpoints/step-NNNNNNN`` of optimizer step ``step``."""
    return output_dir / CHECKPOINTS / f"step-{step:07d}"


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """The run's complete checkpoints (``step-NNNNNNN`` folders with a trainer
    state), oldest first; never a leftover ``step-N.tmp``."""
    folder = output_dir / CHECKPOINTS
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if re.fullmatch(r"step-\d+", p.name) and (p / STATE_FILE).is_file())


def write_trainer_state(checkpoint: Path, state: TrainerState) -> None:
    """``checkpoint/trainer_state.json``: written last, it marks the checkpoint complete."""
    write_json_atomic(checkpoint / STATE_FILE, dataclasses.asdict(state), indent=2)


def read_trainer_state(checkpoint: Path) -> TrainerState:
    """The trainer state of a complete checkpoint (a field added since it was
    written takes its default)."""
    return TrainerState(**json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8")))


def latest_trainer_state(output_dir: Path) -> TrainerState | None:
    """The trainer state of the run's latest complete checkpoint, if any."""
    done = complete_checkpoints(output_dir)
    return read_trainer_state(done[-1]) if done else None


# --- run.json ----------------------------------------------------------------


def _settings(method: str, recipe: Recipe, options: dict[str, Any], training: TrainingConfig) -> dict[str, Any]:
    settings = {"method": method, "recipe": to_dict(recipe), "options": options, "training": to_dict(training)}
    return json.loads(json.dumps(settings))  # as read back (tuples become lists)


def run_settings(config: RunConfig) -> dict[str, Any]:
    """The method, resolved recipe, options and training settings of a run, as ``run.json`` stores them."""
    return _settings(config.method, config.recipe, to_dict(config.options), config.training)


def write_run_file(output_dir: Path, config: RunConfig, *, total_steps: int,
                   trainable_parameters: dict[str, int]) -> None:
    """``run.json``: :func:`run_settings`, K and the trainable parameter count per group."""
    manifest = {**run_settings(config), "total_steps": total_steps, "trainable_parameters": trainable_parameters}
    write_json_atomic(output_dir / RUN_FILE, manifest, indent=2)


@dataclass(frozen=True)
class RunRecord:
    """``run.json`` read back.  ``recipe`` and ``training`` are rebuilt with
    :func:`~distillkit.config.schema.build`, so a key added to the schema
    since the run was made reads as its default; ``options`` are the
    method's options as recorded.  A ``run.json`` that records only a recipe
    (a model folder written by hand) reads with the defaults for the rest."""

    recipe: Recipe
    method: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    total_steps: int = 0
    trainable_parameters: dict[str, int] = field(default_factory=dict)

    @property
    def settings(self) -> dict[str, Any]:
        """As :func:`run_settings` gives them, to compare with another run."""
        return _settings(self.method, self.recipe, self.options, self.training)


def run_record(data: Any) -> RunRecord:
    """A ``run.json`` object (or :func:`run_settings`) read back; raises
    ValueError or DistillkitError on another shape."""
    if not isinstance(data, dict):
        raise ValueError(f"a JSON object was expected, got {type(data).__name__}")
    return RunRecord(recipe=build(Recipe, data.get("recipe", {}), "recipe"), method=data.get("method", ""),
                     options=data.get("options", {}), training=build(TrainingConfig, data.get("training", {}), "training"),
                     total_steps=data.get("total_steps", 0), trainable_parameters=data.get("trainable_parameters", {}))


def read_run_file(folder: Path) -> RunRecord | None:
    """The run recorded in ``folder/run.json``, or None when there is none."""
    path = folder / RUN_FILE
    if not path.is_file():
        return None
    try:
        return run_record(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, DistillkitError) as err:  # JSONDecodeError is a ValueError
        raise DistillkitError(f"{path} cannot be read ({str(err).splitlines()[0]}); it was not written by this "
                              "version of distillkit, or is damaged") from None


def recipe_of_model(model_dir: Path) -> Recipe:
    """The recipe of the run that produced a model folder: from the
    ``run.json`` in it or in its run folder (``best/`` is the model folder of
    a run), else the defaults (the paper's lengths and sampling)."""
    for folder in (model_dir, model_dir.parent):
        record = read_run_file(folder)
        if record is not None:
            return record.recipe
    return Recipe()


# --- metrics.jsonl -------------------------------------------------------------


def append_metrics(output_dir: Path, record: dict[str, Any]) -> None:
    """Add one record (with its ``"step"``) to ``metrics.jsonl``."""
    with open(output_dir / METRICS_FILE, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


def read_metrics(output_dir: Path) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl`` in order (none if it is absent)."""
    path = output_dir / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def truncate_metrics(output_dir: Path, step: int) -> None:
    """Drop the records written after step ``step`` (those of steps a
    resumed run will redo), atomically."""
    if (output_dir / METRICS_FILE).is_file():
        kept = [record for record in read_metrics(output_dir) if record["step"] <= step]
        write_text_atomic(output_dir / METRICS_FILE, "".join(json.dumps(record) + "\n" for record in kept))
