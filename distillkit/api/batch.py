"""The data types a plugin sees: examples, token-level batches, and the
helpers that build batches from token ids."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Literal

import torch


@dataclass(frozen=True)
class InstructionExample:
    """One instruction-following example, independent of its file format.

    ``references`` holds one or more reference responses; the first is the
    training target.  ``origin`` says where the row came from (``file:line``)
    so that errors can point at it.  ``prompt``, when set, is the model input
    ``x`` used verbatim instead of the template (a row's own ``prompt`` field,
    kept with ``data.prompt = "field"``).
    """

    instruction: str
    input: str
    references: tuple[str, ...]
    origin: str = ""
    prompt: str | None = None


@dataclass(frozen=True)
class TokenizedExample:
    """Prompt and reference-response token ids of one example.

    ``response_ids`` ends with EOS unless the response was cut at the length
    limit.
    """

    prompt_ids: list[int]
    response_ids: list[int]
    example: InstructionExample


ExampleBatch = list[TokenizedExample]


@dataclass
class TopKSignal:
    """A sparse teacher next-token distribution at each label position of a
    batch: its ``k`` most likely tokens, and every other token lumped into
    one tail bucket.

    ``indices`` (B, T-1, k) int64 token ids, ``logprobs`` (B, T-1, k) their
    log-probabilities and ``tail`` (B, T-1) the log of the remaining mass,
    all at softmax temperature 1 (``exp(logprobs).sum(-1) + exp(tail)`` is 1
    up to storage rounding; ``tail`` is -inf when k = V).  ``valid`` (B, T-1)
    bool, if given, marks the positions the signal covers (a teacher with
    another tokenizer has no distribution where no teacher token starts);
    rows outside ``label_mask & valid`` hold anything.  A divergence to it
    compares the two distributions on these k + 1 outcomes (see
    :func:`distillkit.engine.losses.masked_token_divergences`).
    """

    indices: torch.Tensor
    logprobs: torch.Tensor
    tail: torch.Tensor
    valid: torch.Tensor | None = None

    @property
    def k(self) -> int:
        return self.indices.shape[-1]

    def to(self, device: torch.device | str) -> TopKSignal:
        return TopKSignal(*(t.to(device) if t is not None else None
                            for t in (self.indices, self.logprobs, self.tail, self.valid)))


@dataclass
class ResponseLogits:
    """A model's next-token logits (N, V) at a batch's N label positions
    (``label_mask``, row-major), held unmaterialised: the final hidden states
    ``hidden`` (N, H) and the model's output layer ``head`` (a module mapping
    (n, H) -> (n, >= V)), so the loss helpers compute the logits a chunk of
    rows at a time and never hold all N x V of them.  ``head`` None means
    ``hidden`` already holds the logits (N, >= V).  Only the first
    ``vocab_size`` logits count (padded output rows are dropped).
    ``tracks_grad``: whether gradients flow through the output layer, by
    default the grad mode it is made in, so logits made under
    ``torch.no_grad()`` stay constants when their rows are computed later."""

    hidden: torch.Tensor
    head: torch.nn.Module | None
    vocab_size: int
    tracks_grad: bool = field(default_factory=torch.is_grad_enabled)

    @property
    def num_rows(self) -> int:
        return self.hidden.shape[0]

    def rows(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Logits (n, V) of rows ``start:stop``, in the head's dtype."""
        hidden = self.hidden[start:stop]
        if self.head is None:
            return hidden[..., : self.vocab_size]
        weight = next(self.head.parameters(), None)
        with torch.set_grad_enabled(self.tracks_grad and torch.is_grad_enabled()):
            return self.head(hidden if weight is None else hidden.to(weight.dtype))[..., : self.vocab_size]

    def materialize(self) -> torch.Tensor:
        """All the logits (N, V): what the chunked helpers avoid; for code that needs them whole."""
        return self.rows()


@dataclass(frozen=True)
class LossTerm:
    """One weighted term of a loss over a trainable distribution's response
    tokens (:meth:`StepContext.loss`): the cross-entropy of the batch's labels
    when ``divergence`` is None, else the registered divergence of that name
    to ``target`` (dense logits, :class:`ResponseLogits` or a
    :class:`TopKSignal`; it gets no gradient) at softmax ``temperature`` with
    the divergence's ``params``.  Its value is averaged over the response
    tokens (nats per token) and enters the loss times ``weight``."""

    weight: float = 1.0
    divergence: str | None = None
    target: torch.Tensor | ResponseLogits | TopKSignal | None = None
    temperature: float = 1.0
    params: dict[str, float] = field(default_factory=dict)


@dataclass
class TrainBatch:
    """A right-padded teacher-forcing batch ``[x ‖ y]``.

    ``input_ids``, ``attention_mask``, ``response_mask``: (B, T).
    ``response_mask`` is true at response tokens (through the first EOS),
    false at prompt and padding positions.  ``labels``/``label_mask`` are the
    shifted views that logits at positions ``0..T-2`` predict.
    ``teacher_signal``: the teacher's cached top-k signal at the label
    positions, which the trainer attaches when the run reads one
    (``[teacher_signal] top_k``); a loss reads it with
    :meth:`~distillkit.api.StepContext.teacher_signal`.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    teacher_signal: TopKSignal | None = field(default=None, kw_only=True)

    @property
    def labels(self) -> torch.Tensor:
        """(B, T-1) next-token targets."""
        return self.input_ids[:, 1:]

    @property
    def label_mask(self) -> torch.Tensor:
        """(B, T-1) true where the target is a response token."""
        return self.response_mask[:, 1:]

    @property
    def num_response_tokens(self) -> int:
        return int(self.label_mask.sum())

    def to(self, device: torch.device | str) -> TrainBatch:
        """This batch (of this class) with every tensor and nested batch on ``device``."""
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return replace(self, **{k: v.to(device) for k, v in moved.items()
                                if isinstance(v, (torch.Tensor, TrainBatch, TopKSignal))})


@dataclass
class PairedBatch(TrainBatch):
    """Two aligned views of the same prompts: this batch ``[x ‖ y]`` and
    ``paired``, ``[x ‖ y']``, row i of both from the same example (e.g. a
    teacher and a student response of one prompt, as DistiLLM-2 contrasts).

    A source returns it in place of a :class:`TrainBatch`; the trainer moves
    ``paired`` with it and weights the micro-batch by this (primary) view's
    response tokens; a loss reads ``batch.paired``.  Each view has its own
    (B, T) shapes, B the same.
    """

    paired: TrainBatch


def collate(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> TrainBatch:
    """Right-pad ``prompt + response`` sequences into a :class:`TrainBatch`.

    Masks are built from lengths, never from ``token == pad`` (pad may equal EOS).
    """
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    width = max(lengths)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    response_mask = torch.zeros((len(prompts), width), dtype=torch.bool)
    for row, (prompt, response) in enumerate(zip(prompts, responses)):
        sequence = prompt + response
        input_ids[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        attention_mask[row, : len(sequence)] = 1
        response_mask[row, len(prompt) : len(sequence)] = True
    return TrainBatch(input_ids, attention_mask, response_mask)


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad prompts for generation; returns ``(input_ids, attention_mask)`` (B, P)."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        attention_mask[row, width - len(prompt) :] = 1
    return input_ids, attention_mask


CappedEnding = Literal["open", "eos"]
"""What a sampled response cut at its length limit ends with: ``"open"`` as
sampled, ``"eos"`` its last token replaced by EOS."""


def ended_with_eos(response: list[int], eos_token_id: int) -> list[int]:
    """``response`` with its last token replaced by EOS unless it already
    ends with one (a response cut at its length limit; empty stays empty)."""
    if not response or response[-1] == eos_token_id:
        return response
    return [*response[:-1], eos_token_id]
