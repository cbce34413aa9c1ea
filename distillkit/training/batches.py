"""Which examples each optimizer step trains on: the number of steps K,
each epoch's order of the training examples, the global batch of step k and
this process's share of it, cut into micro-batches."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from distillkit.api import TokenizedExample
from distillkit.config import TrainingConfig
from distillkit.errors import DistillkitError

ExampleOrder = Callable[[int], list[int]]
"""``order(epoch)``: the indices of the training examples in the order epoch ``epoch`` (0-based) takes them."""


def total_steps(training: TrainingConfig, num_examples: int) -> int:
    """K: ``max_steps`` if set, else ``epochs`` passes over the data."""
    if training.max_steps > 0:
        return training.max_steps
    return max(1, math.ceil(training.epochs * math.ceil(num_examples / training.batch_size)))


def eval_interval(training: TrainingConfig, num_examples: int) -> int:
    """Steps between two validations: ``eval_every``, by default one epoch."""
    return training.eval_every or math.ceil(num_examples / training.batch_size)


def recipe_order(training: TrainingConfig, examples: list[TokenizedExample], epoch: int) -> list[int]:
    """The recipe's order of epoch ``epoch``: with ``shuffle``, a fixed
    permutation per epoch (seeded by training seed and epoch, so resume is
    exact); with ``group_by_length`` too, windows of 64 batches are sorted by
    length and their batches shuffled, which cuts padding.  Without
    ``shuffle``, file order."""
    if not training.shuffle:
        return list(range(len(examples)))
    generator = torch.Generator().manual_seed(training.seed * 100_003 + epoch)
    order = torch.randperm(len(examples), generator=generator).tolist()
    if not training.group_by_length:
        return order
    size, window = training.batch_size, training.batch_size * 64
    grouped = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window],
                       key=lambda i: len(examples[i].prompt_ids) + len(examples[i].response_ids))
        batches = [chunk[i : i + size] for i in range(0, len(chunk), size)]
        for b in torch.randperm(len(batches), generator=generator).tolist():
            grouped.extend(batches[b])
    return grouped


class StepExamples:
    """The examples of every optimizer step: step k of epoch e takes the
    k-th ``batch_size`` slice of ``order(e)`` (the last batch of an epoch
    may be short), and process i of N its i-th contiguous share.  ``order``
    defaults to :func:`recipe_order`; a given one must return a permutation
    of the example indices (checked)."""

    def __init__(self, examples: list[TokenizedExample], training: TrainingConfig, *, process_index: int,
                 num_processes: int, order: ExampleOrder | None = None) -> None:
        self.examples, self.batch_size = examples, training.batch_size
        self.process_index, self.num_processes = process_index, num_processes
        self.order = order or (lambda epoch: recipe_order(training, examples, epoch))
        self.steps_per_epoch = math.ceil(len(examples) / training.batch_size)
        self._epoch: int | None = None
        self._indices: list[int] = []

    def _epoch_indices(self, epoch: int) -> list[int]:
        if self._epoch != epoch:
            indices = list(self.order(epoch))
            if sorted(indices) != list(range(len(self.examples))):
                raise DistillkitError(f"example_order({epoch}) must return a permutation of range("
                                      f"{len(self.examples)}) (each training example once); fix the order function")
            self._epoch, self._indices = epoch, indices
        return self._indices

    def for_step(self, step: int) -> list[TokenizedExample]:
        """This process's share of the global batch of optimizer step ``step`` (0-based)."""
        epoch, index = divmod(step, self.steps_per_epoch)
        batch = self._epoch_indices(epoch)[index * self.batch_size : (index + 1) * self.batch_size]
        share = math.ceil(len(batch) / self.num_processes)
        start = self.process_index * share
        return [self.examples[i] for i in batch[start : start + share]]


def micro_chunks(examples: list[TokenizedExample], size: int) -> list[list[TokenizedExample]]:
    """``examples`` cut into micro-batches of ``size`` (the last may be short)."""
    return [examples[i : i + size] for i in range(0, len(examples), size)]
