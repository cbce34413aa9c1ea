"""Prefix embeddings: m vectors (a soft prompt) that take the first m input
positions of a model, in training passes and in the sampler alike."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch


@contextlib.contextmanager
def prefix_embeddings(model: torch.nn.Module, prefix: torch.Tensor) -> Iterator[None]:
    """Within the context, the first m positions of every forward pass of
    ``model`` take ``prefix`` (m, d) as their input embeddings, whatever token
    ids stand there.  The swap happens inside the embedding layer's forward,
    so it also works when the weights are sharded (FSDP gathers them only
    during the forward pass), and gradients flow into ``prefix``."""
    length = prefix.shape[0]

    def swap(module: torch.nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        front = prefix.to(device=output.device, dtype=output.dtype).expand(output.shape[0], -1, -1)
        return torch.cat([front, output[:, length:]], dim=1)

    handle = model.get_input_embeddings().register_forward_hook(swap)
    try:
        yield
    finally:
        handle.remove()


def with_prefix_slots(input_ids: torch.Tensor, attention_mask: torch.Tensor, length: int) -> tuple[torch.Tensor, ...]:
    """(B, T) ids and mask with ``length`` attended placeholder positions in
    front, for :func:`prefix_embeddings` to fill."""
    slots = input_ids.new_zeros((input_ids.shape[0], length))
    return torch.cat([slots, input_ids], dim=1), torch.cat([torch.ones_like(slots), attention_mask], dim=1)
