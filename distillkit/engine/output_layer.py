"""Run a causal LM without its output layer, so that only the positions a
loss reads ever reach it.

Inside :func:`deferred_output_layer` the model's output layer (its
``get_output_embeddings()``, the LM head) gets an empty input, so it does
no work, and hands back its real input instead: the ``logits`` field of
the model's output then holds the final hidden states (B, S, H), sliced by
whatever code sits between (a soft prompt's positions dropped, ``[:, :-1]``)
exactly as logits would be.  The caller gathers the response positions and
applies the head to them chunk by chunk (:class:`distillkit.api.ResponseLogits`).

That is only right when the model's logits are the head's output
unchanged; :func:`defers_exactly` checks it once per model on a short
input (a model that rescales or soft-caps its logits after the head, e.g.
Gemma 2's ``final_logit_softcapping``, fails the check and keeps dense
logits).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel


def output_layer(model: torch.nn.Module) -> torch.nn.Module | None:
    """The model's LM head (through a DDP or peft wrapper), or None if it names none."""
    if isinstance(model, DistributedDataParallel):
        model = model.module
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if getter is not None else None
    return head if isinstance(head, torch.nn.Module) else None


@contextmanager
def deferred_output_layer(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Within the block, ``model(...).logits`` are the final hidden states (B, S, H); yields the head."""
    head = output_layer(model)
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output layer (get_output_embeddings) to defer")
    handed: list[torch.Tensor] = []

    def skip(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        handed.append(args[0])
        return (args[0][..., :0, :], *args[1:])

    def hand_back(module: torch.nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        return handed.pop()

    hooks = [head.register_forward_pre_hook(skip), head.register_forward_hook(hand_back)]
    try:
        yield head
    finally:
        for hook in hooks:
            hook.remove()


@torch.no_grad()
def defers_exactly(model: torch.nn.Module, input_ids: torch.Tensor) -> bool:
    """Whether the head applied to the deferred hidden states gives ``model``'s logits on ``input_ids``
    (1, S) (up to float rounding), i.e. whether nothing changes the logits after the head."""
    if output_layer(model) is None:
        return False
    was_training = model.training
    model.eval()
    try:
        logits = model(input_ids=input_ids).logits
        with deferred_output_layer(model) as head:
            hidden = model(input_ids=input_ids).logits
        if hidden.shape[:-1] != logits.shape[:-1]:
            return False
        weight = next(head.parameters())
        rebuilt = head(hidden.to(weight.dtype))
    finally:
        model.train(was_training)
    tolerance = 1e-3 if weight.dtype in (torch.float16, torch.bfloat16) else 1e-5
    return rebuilt.shape == logits.shape and bool(torch.allclose(rebuilt.float(), logits.float(), rtol=tolerance,
                                                                 atol=tolerance * logits.float().abs().max()))
