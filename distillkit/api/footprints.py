"""What a component keeps in memory, declared for the memory planner
(``distillkit train --dry-run``, :mod:`distillkit.planning`).

A :class:`~distillkit.api.SourceFactory`, a
:class:`~distillkit.api.TeacherAdapterFactory` and a
:class:`~distillkit.api.Stage` may declare ``footprint(plan, options)``:
``plan`` is the :class:`PlanContext` (the run's settings, the processes,
the model sizes), ``options`` the component's options (a stage's: the
method's).  It returns what the component holds beyond the core's own rows
(weights, optimizer states, activations and logits of a stage); the planner
turns the declaration into rows and computes the bytes that follow from the
model shapes (a KV cache per sampled token, activations per token).  A
component without a footprint adds no rows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

if TYPE_CHECKING:
    import torch

    from distillkit.config.assembly import RunConfig

ModelRole = Literal["student", "teacher"]


class ModelSizes(Protocol):
    """What a footprint may read of a model's shape (no weights are loaded)."""

    parameters: int
    layers: int
    hidden: int  # d, the embedding width
    vocab: int  # V, the logits' columns (padding rows included)
    dtype_bytes: int  # bytes per weight


@dataclass(frozen=True)
class PlanContext:
    """What a footprint function receives.

    ``micro_batch`` is the sequences of one forward pass per process (the
    process's share of ``training.batch_size``, at most
    ``training.micro_batch_size``); ``new_tokens`` the most tokens a sample
    adds (``generation.max_new_tokens``, capped to ``data.max_length``).
    ``meta_teacher()`` builds the teacher on the meta device (no weights,
    no memory), e.g. to count the layers an adapter wraps; only with a teacher.
    """

    config: RunConfig
    processes: int
    micro_batch: int
    new_tokens: int
    student: ModelSizes
    teacher: ModelSizes | None
    meta_teacher: Callable[[], torch.nn.Module]

    def share(self, count: int) -> int:
        """One process's share of ``count`` items split over the processes (rounded up)."""
        return -(-count // self.processes)


@dataclass(frozen=True)
class Logits:
    """fp32 logits held at once: ``full`` copies of (B, T, V) and
    ``gathered`` copies of the response rows (N, V)."""

    full: int = 0
    gathered: int = 0


@dataclass(frozen=True)
class Buffer:
    """State kept for the whole run: ``bytes`` per process, in CPU RAM or on the device."""

    name: str
    bytes: int
    note: str = ""
    in_cpu_ram: bool = True


@dataclass(frozen=True)
class SourceFootprint:
    """What a pseudo-target source holds.

    ``samples_from``: the models it samples from, in order, each holding a KV
    cache of ``batch`` sequences of ``data.max_length`` tokens (the teacher's
    plus its adapter's extra positions) while it samples.  ``scoring``:
    logits it holds per sampled batch of ``batch`` sequences (no gradients),
    e.g. to keep log-probabilities of its samples.  ``buffers``: what it
    keeps across steps.
    """

    samples_from: tuple[ModelRole, ...] = ()
    batch: int = 0
    scoring: Logits = Logits()
    buffers: tuple[Buffer, ...] = ()


@dataclass(frozen=True)
class AdapterFootprint:
    """What a teacher adapter adds to the frozen teacher.

    ``trainable``: the fp32 values it trains (16 B each with their gradient
    and two AdamW moments), ``note`` what they are ("soft prompt 7 x 1600").
    ``extra_positions``: positions it prepends to every teacher sequence.
    ``gradients_to_inputs_only``: a gradient-carrying pass sends gradients
    through the teacher's layers to its inputs only (a prompt), so they keep
    no weight-gradient inputs.  ``dropout``: the teacher runs in train mode in
    gradient-carrying passes.
    """

    trainable: int = 0
    note: str = ""
    extra_positions: int = 0
    gradients_to_inputs_only: bool = False
    dropout: bool = False


@dataclass(frozen=True)
class StageFootprint:
    """What a stage holds beyond the core's logits copies at its peak (see
    :mod:`distillkit.planning.plan`): ``extra_logits`` of the stage's
    micro-batch, and ``student_graphs``, the student forward passes whose
    activations are kept together for one backward."""

    extra_logits: Logits = Logits()
    student_graphs: int = 1
