"""Checkpoints: written atomically by every process, the oldest pruned, and
read back on resume from the latest one that loads.

A checkpoint holds what ``accelerate`` saves (safetensors weights;
optimizer, scheduler and RNG states, read back with ``weights_only=True``),
distillkit's own run state per process (``run_state_RANK``: what accelerate
does not checkpoint, as safetensors + JSON) and, written last, the trainer
state that marks it complete (see :mod:`distillkit.config.run_folder`).

Run state (nested state dicts of optimizers, soft prompts, LoRA weights,
rollout buffers, stateful schedules) is saved without pickle: :func:`save_state` splits a
nested structure of dicts, lists, tuples, scalars, strings and tensors into
the tensors (one safetensors file, keys ``"0"``, ``"1"``, ...) and a JSON
skeleton that names them; :func:`load_state`
joins them again.  Dicts with non-string keys (an optimizer's per-parameter
``state`` is keyed by int) and tuples keep their types.  Nothing is
unpickled, so a run folder from elsewhere cannot run code when resumed.
"""

from __future__ import annotations

import json
import logging
import pickle
import shutil
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from distillkit.config.run_folder import (
    CHECKPOINTS,
    TrainerState,
    checkpoint_folder,
    complete_checkpoints,
    read_trainer_state,
    write_trainer_state,
)
from distillkit.errors import DistillkitError
from distillkit.files import scratch_dir, swap_in, write_json_atomic

log = logging.getLogger(__name__)

RUN_STATE = "run_state"  # distillkit's own state per process: run_state_RANK.{safetensors,json}


def _split(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = value.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value) and "__tensor__" not in value:
            return {k: _split(v, tensors) for k, v in value.items()}
        return {"__items__": [[_split(k, tensors), _split(v, tensors)] for k, v in value.items()]}
    if isinstance(value, tuple):
        return {"__tuple__": [_split(v, tensors) for v in value]}
    if isinstance(value, list):
        return [_split(v, tensors) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store a {type(value).__name__} in run state (tensors, numbers, strings, lists, dicts)")


def _join(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_join(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tensor__" in value:
        return tensors[value["__tensor__"]]
    if "__items__" in value:
        return {_join(k, tensors): _join(v, tensors) for k, v in value["__items__"]}
    if "__tuple__" in value:
        return tuple(_join(v, tensors) for v in value["__tuple__"])
    return {k: _join(v, tensors) for k, v in value.items()}


def save_state(state: Any, path: Path) -> None:
    """Write ``state`` as ``path.safetensors`` (its tensors) and ``path.json`` (the rest)."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _split(state, tensors)
    save_file(tensors, str(path.with_suffix(".safetensors")))
    write_json_atomic(path.with_suffix(".json"), skeleton)


def load_state(path: Path) -> Any:
    """The state written by :func:`save_state` at ``path``; a missing or
    damaged file raises :class:`DistillkitError` naming it."""
    try:
        tensors = load_file(str(path.with_suffix(".safetensors")))
        skeleton = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
        return _join(skeleton, tensors)
    except (OSError, ValueError, KeyError, RuntimeError) as err:  # SafetensorError is an OSError/ValueError kind
        raise DistillkitError(f"run state {path}.{{json,safetensors}} is missing or damaged: {err}") from err


def run_state_owners(optimizers: dict[str, Any], teacher: Any, source: Any, schedules: Any | None) -> dict[str, Any]:
    """What distillkit checkpoints itself, by run-state name: the
    ``optimizers`` (and schedulers) that accelerate does not, the teacher
    adapter's ``checkpoint_modules()``, a source with a ``state_dict``
    (e.g. a rollout buffer) and the states of the stateful schedules
    (``schedules``; None for a method that declares none)."""
    owners = dict(optimizers)
    for index, module in enumerate(getattr(teacher, "checkpoint_modules", lambda: [])()):
        owners[f"teacher_adapter/{index}"] = module
    if hasattr(source, "state_dict"):
        owners["source"] = source
    if schedules is not None:
        owners["schedules"] = schedules
    return owners


def save_checkpoint(accelerator: Accelerator, output_dir: Path, state: TrainerState, owners: dict[str, Any], *,
                    keep: int) -> None:
    """Checkpoint step ``state.step``: every process writes its part (and
    the state of ``owners``, by name) into ``step-K.tmp``; the main process
    then adds the trainer state, swaps the folder in and removes all but
    the newest ``keep`` checkpoints."""
    final = checkpoint_folder(output_dir, state.step)
    scratch = scratch_dir(final, clear=accelerator.is_main_process)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(scratch), safe_serialization=True)
    save_state({name: owner.state_dict() for name, owner in owners.items()},
               scratch / f"{RUN_STATE}_{accelerator.process_index}")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_trainer_state(scratch, state)
        swap_in(scratch, final)
        for old in complete_checkpoints(output_dir)[: -max(keep, 1)]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def load_checkpoint(accelerator: Accelerator, checkpoint: Path, owners: dict[str, Any]) -> TrainerState:
    """Restore what :func:`save_checkpoint` wrote (weights, optimizers,
    schedulers and RNG states through accelerate, which unpickles only with
    ``weights_only=True``; the run state of ``owners``); returns the trainer state."""
    accelerator.load_state(str(checkpoint))
    extra = load_state(checkpoint / f"{RUN_STATE}_{accelerator.process_index}")
    for name, owner in owners.items():
        owner.load_state_dict(extra[name])
    return read_trainer_state(checkpoint)


def load_latest_checkpoint(accelerator: Accelerator, output_dir: Path, owners: dict[str, Any]) -> TrainerState:
    """:func:`load_checkpoint` of the newest complete checkpoint that loads;
    one that does not (damaged, or holding a pickle that ``weights_only``
    refuses) is logged and the one before it tried."""
    for checkpoint in reversed(complete_checkpoints(output_dir)):
        try:
            state = load_checkpoint(accelerator, checkpoint, owners)
        except (DistillkitError, OSError, ValueError, RuntimeError, KeyError, TypeError, pickle.UnpicklingError,
                SafetensorError) as err:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            log.warning("checkpoint %s cannot be loaded (%s); trying the one before", checkpoint.name, reason)
            continue
        log.info("resumed from %s (step %d)", checkpoint, state.step)
        return state
    raise DistillkitError(f"no checkpoint in {output_dir / CHECKPOINTS} can be loaded (see the warnings); "
                          "start a new run with another --output")
