"""Run state as safetensors + JSON: nested state dicts (of optimizers, soft
prompts, LoRA weights, rollout buffers) saved without pickle.

:func:`save_state` splits a nested structure of dicts, lists, tuples,
scalars, strings and tensors into the tensors (one safetensors file, keys
``"0"``, ``"1"``, ...) and a JSON skeleton that names them; :func:`load_state`
joins them again.  Dicts with non-string keys (an optimizer's per-parameter
``state`` is keyed by int) and tuples keep their types.  Nothing is
unpickled, so a run folder from elsewhere cannot run code when resumed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from distillkit.errors import DistillkitError


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
    path.with_suffix(".json").write_text(json.dumps(skeleton) + "\n", encoding="utf-8")


def load_state(path: Path) -> Any:
    """The state written by :func:`save_state` at ``path``; a missing or
    damaged file raises :class:`DistillkitError` naming it."""
    try:
        tensors = load_file(str(path.with_suffix(".safetensors")))
        skeleton = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
        return _join(skeleton, tensors)
    except (OSError, ValueError, KeyError, RuntimeError) as err:  # SafetensorError is an OSError/ValueError kind
        raise DistillkitError(f"run state {path}.{{json,safetensors}} is missing or damaged: {err}") from err
