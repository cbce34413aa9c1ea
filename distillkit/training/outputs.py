"""The training side of the run folder (its format and reader:
:mod:`distillkit.config.run_folder`): whether a folder may take this run,
and the best student's export."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from distillkit.config import Recipe, RunConfig
from distillkit.config.run_folder import (
    BEST_FILE,
    METRICS_FILE,
    RUN_FILE,
    RunRecord,
    complete_checkpoints,
    read_run_file,
    run_settings,
)
from distillkit.engine.models import save_model, saved_generation
from distillkit.errors import DistillkitError
from distillkit.evaluation.protocol import eval_sampling
from distillkit.files import replace_dir, write_json_atomic
from distillkit.training.model_card import ADAPTER_DIR, write_model_card

# recipe and manifest keys that may change when a run is resumed: they change no update done so far
RESUMABLE = ("training.max_steps", "training.epochs", "training.eval_every", "training.save_every",
             "training.log_every", "training.keep_checkpoints", "training.on_nonfinite", "training.progress_bar",
             "training.final_checkpoint", "generation.batch_size", "logging.report_to", "logging.project",
             "logging.run_name")


def _differences(old: Any, new: Any, prefix: str = "") -> dict[str, tuple[Any, Any]]:
    """The dotted keys at which two JSON values differ, with both values."""
    if isinstance(old, dict) and isinstance(new, dict):
        found: dict[str, tuple[Any, Any]] = {}
        for key in sorted(set(old) | set(new)):
            found.update(_differences(old.get(key), new.get(key), f"{prefix}{key}."))
        return found
    return {} if old == new else {prefix.rstrip("."): (old, new)}


def changed_settings(recorded: RunRecord, config: RunConfig) -> dict[str, tuple[Any, Any]]:
    """The settings in which ``config``'s run differs from the ``recorded``
    one, as dotted key -> (recorded value, value now), leaving out the keys
    of :data:`RESUMABLE` and the recipe's sections of other methods (which
    this run does not read)."""
    own = f"recipe.methods.{config.method}"
    return {key: values for key, values in _differences(recorded.settings, run_settings(config)).items()
            if not any(key == allowed or key.endswith("." + allowed) for allowed in RESUMABLE)
            and (not key.startswith("recipe.methods.") or f"{key}.".startswith(f"{own}."))}


def describe_changes(changed: dict[str, tuple[Any, Any]]) -> str:
    """The first of :func:`changed_settings`' differences, for one line."""
    (key, (old, new)), more = next(iter(changed.items())), len(changed) - 1
    return f"{key} is {old!r} there, {new!r} now" + (f" (and {more} more)" if more else "")


def check_run_folder(output_dir: Path, config: RunConfig, *, resume: bool) -> Path | None:
    """Before any model is loaded: refuse a folder that holds a run unless
    ``resume``, and a run made with other settings (:func:`changed_settings`;
    a key the schema gained since the run was made compares as its
    default).  Returns the latest complete checkpoint."""
    done = complete_checkpoints(output_dir)
    leftovers = [p.name for p in (output_dir / RUN_FILE, output_dir / METRICS_FILE) if p.exists()]
    if not resume and (done or leftovers):
        held = f"checkpoint {done[-1].name}" if done else f"{', '.join(leftovers)} of a run without a checkpoint"
        raise DistillkitError(f"{output_dir} already holds a run ({held}); pass --resume to continue it or choose "
                              "another --output")
    recorded = read_run_file(output_dir)
    changed = {} if recorded is None else changed_settings(recorded, config)
    if changed:
        raise DistillkitError(f"{output_dir} holds another run: {describe_changes(changed)}; resume with its settings "
                              f"or choose another --output (may change on resume: {', '.join(RESUMABLE)})")
    return done[-1] if done else None


def save_best(accelerator: Accelerator, student: torch.nn.Module, teacher: Any, tokenizer: Any, folder: Path,
              record: dict[str, Any], *, recipe: Recipe, sharded: bool) -> None:
    """The student (full weights, gathered from every process when it is
    sharded; call it in every process) with ``generation_config.json``
    (the recipe's evaluation sampling), the teacher adapter's own files (if
    it saves any), ``record`` (its step, validation metrics and cost so far)
    as ``best.json`` and the model card (the run folder is ``folder``'s
    parent), replacing ``folder`` atomically."""
    # gathered (collectively) only when sharded: a copied state dict would store tied weights twice
    state = accelerator.get_state_dict(student) if sharded else None
    if not accelerator.is_main_process:
        return

    def write(scratch: Path) -> None:
        generation = saved_generation(tokenizer, eval_sampling(recipe), recipe.data.max_length)
        save_model(accelerator.unwrap_model(student), tokenizer, scratch, state_dict=state, generation=generation)
        save_adapter = getattr(teacher, "save", None)
        if save_adapter is not None:
            save_adapter(scratch / ADAPTER_DIR)
        write_json_atomic(scratch / BEST_FILE, record, indent=2)
        write_model_card(scratch, folder.parent)

    replace_dir(folder, write)
