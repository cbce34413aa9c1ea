"""What a method's stage losses see: the models, the options, the step and
the shared loss helpers (all averaged over response tokens)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from distillkit.api import (
    CappedEnding,
    ExampleBatch,
    LossTerm,
    ResponseLogits,
    SamplerRule,
    Schedule,
    TeacherAdapter,
    TokenizedExample,
    TopKSignal,
    TrainBatch,
    VocabularyAligner,
)
from distillkit.config import RunConfig
from distillkit.data.tokenization import tokenize
from distillkit.engine.losses import (
    Logits,
    Target,
    masked_cross_entropy,
    masked_divergence,
    masked_objective,
    masked_token_divergences,
)
from distillkit.engine.output_layer import deferred_output_layer, defers_exactly
from distillkit.errors import DistillkitError
from distillkit.files import fingerprint
from distillkit.registry import registry


@dataclass
class ScheduleStates:
    """The states of a run's stateful schedules, by schedule name: each entry
    holds the ``params`` it was evaluated with and its ``state``; checkpointed
    as run state (``state_dict`` / ``load_state_dict``)."""

    entries: dict[str, dict[str, Any]] = field(default_factory=dict)

    def entry(self, schedule: Schedule, params: dict[str, float]) -> dict[str, Any]:
        """The entry of ``schedule``, created with its initial state at its first evaluation."""
        entry = self.entries.setdefault(schedule.name, {"params": params, "state": schedule.initial_state(**params)})
        if entry["params"] != params:
            raise DistillkitError(f"schedule '{schedule.name}' keeps one state per run but was evaluated with "
                                  f"{params} after {entry['params']}; evaluate it with the same parameters")
        return entry

    def state_dict(self) -> dict[str, Any]:
        return self.entries

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.entries = state


@dataclass
class Run:
    """The live state of one training run.

    ``step`` is k, the optimizer steps done so far (0-based), and
    ``total_steps`` is K; schedules are evaluated at (k, K).
    ``train_examples`` is the tokenized training set (for sources that
    pre-generate); ``teacher_id`` names the teacher checkpoint (for caches).
    ``generated_tokens`` counts every token :meth:`sample` has produced.
    ``process_index`` / ``num_processes`` place this process in a
    multi-process run (sources that collect data themselves take their
    share); ``keep_going`` is the sampler's cross-process "unfinished"
    reduction when a model is sharded (see :func:`distillkit.engine.sampling.sample`);
    ``global_sum`` sums a tensor over the processes (every process must call
    it the same number of times, e.g. once per micro-batch);
    ``schedule_states`` holds the stateful schedules' states.
    ``teacher_tokenizer`` and ``aligner``: a teacher with its own tokenizer
    (``[teacher_signal] alignment``) and the built alignment; None when the
    teacher shares ``tokenizer``.  ``aligned`` counts (aligned, all) student
    response label positions of :meth:`teacher_signal` since the trainer last
    reset it.
    """

    config: RunConfig
    student: torch.nn.Module
    tokenizer: Any
    teacher: TeacherAdapter | None = None
    total_steps: int = 0
    step: int = 0
    train_examples: list[TokenizedExample] = field(default_factory=list)
    teacher_id: str = ""
    generated_tokens: int = 0
    process_index: int = 0
    num_processes: int = 1
    keep_going: Callable[[bool], bool] = bool
    global_sum: Callable[[torch.Tensor], torch.Tensor] = lambda tensor: tensor
    schedule_states: ScheduleStates = field(default_factory=ScheduleStates)
    teacher_tokenizer: Any = None
    aligner: VocabularyAligner | None = None
    aligned: list[int] = field(default_factory=lambda: [0, 0])
    defers_head: dict[int, bool] = field(default_factory=dict)

    @property
    def options(self) -> Any:
        """The method's validated options (its ``[methods.NAME]`` section)."""
        return self.config.options

    @property
    def vocab_size(self) -> int:
        """The tokenizer's size; logits are sliced to it (padded output rows)."""
        return len(self.tokenizer)

    def student_logits(self, batch: TrainBatch) -> torch.Tensor:
        """Student next-token logits (B, T-1, V) aligned with ``batch.labels``."""
        out = self.student(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        return out.logits[:, :-1, : self.vocab_size]

    def student_response_logits(self, batch: TrainBatch) -> ResponseLogits:
        """The student's logits at ``batch.label_mask`` (N, V), unmaterialised: only these positions will
        reach its output layer, a chunk at a time, in the loss helpers."""
        return self._response_logits(
            self.student, lambda: self.student(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits,
            batch, self.vocab_size)

    def teacher_response_logits(self, batch: TrainBatch, *, grad: bool = False, adapted: bool = True
                                ) -> ResponseLogits:
        """:meth:`teacher_logits` at ``batch.label_mask`` (N, V), unmaterialised like
        :meth:`student_response_logits`."""
        if self.teacher is None:
            raise RuntimeError(f"method '{self.config.method}' declares no teacher adapter")
        return self._response_logits(self.teacher.sampling_inputs()[0],
                                     lambda: self.teacher.logits(batch, grad=grad, adapted=adapted), batch,
                                     self.teacher_vocab_size, sliced=True)

    def _response_logits(self, model: torch.nn.Module, forward: Callable[[], torch.Tensor], batch: TrainBatch,
                         vocab_size: int, *, sliced: bool = False) -> ResponseLogits:
        """``forward()``'s logits at the label positions; its output layer deferred when that is exact for
        ``model`` (checked once per model).  ``sliced``: ``forward`` already aligns with the labels (T-1)."""
        mask = batch.label_mask
        if id(model) not in self.defers_head:
            self.defers_head[id(model)] = defers_exactly(model, batch.input_ids[:1, :8])
        if not self.defers_head[id(model)]:
            logits = forward() if sliced else forward()[:, :-1]
            return ResponseLogits(logits[mask], None, vocab_size)
        with deferred_output_layer(model) as head:
            hidden = forward() if sliced else forward()[:, :-1]
        return ResponseLogits(hidden[mask], head, vocab_size)

    @property
    def teacher_vocab_size(self) -> int:
        """The teacher's tokenizer size: its own with an alignment, else :attr:`vocab_size`."""
        return self.vocab_size if self.teacher_tokenizer is None else len(self.teacher_tokenizer)

    def teacher_logits(self, batch: TrainBatch, *, grad: bool = False, adapted: bool = True) -> torch.Tensor:
        """Teacher next-token logits (B, T-1, V_t) of ``batch`` in the teacher's tokens (the student's unless
        aligned); no gradient unless asked.  ``adapted=False`` gives the plain teacher (no soft prompt / LoRA)."""
        if self.teacher is None:
            raise RuntimeError(f"method '{self.config.method}' declares no teacher adapter")
        return self.teacher.logits(batch, grad=grad, adapted=adapted)[..., : self.teacher_vocab_size]

    def teacher_signal(self, batch: TrainBatch) -> ResponseLogits | TopKSignal:
        """The batch's cached top-k teacher signal if the trainer attached one; with an alignment, the teacher's
        top-k signal over the student's vocabulary (B, T-1, k) from its logits of the batch re-tokenized, with
        ``valid`` (a teacher view longer than ``data.max_length`` is cut there, its positions past the cut left
        out); else the (adapted) teacher's :meth:`teacher_response_logits`."""
        if batch.teacher_signal is not None:
            return batch.teacher_signal
        if self.aligner is None:
            return self.teacher_response_logits(batch)
        view, alignment = self.aligner.teacher_view(batch)
        room = self.config.recipe.data.max_length  # a finer teacher tokenization may be longer: cut, unaligned past it
        if view.input_ids.shape[1] > room:
            view = TrainBatch(view.input_ids[:, :room], view.attention_mask[:, :room], view.response_mask[:, :room])
            alignment = torch.where(alignment < room - 1, alignment, -1)
        signal = self.aligner.signal(self.teacher_logits(view), alignment, self.config.recipe.teacher_signal.top_k)
        self.aligned[0] += int((alignment >= 0).sum())
        self.aligned[1] += int(batch.label_mask.sum())
        return signal

    def cross_entropy(self, logits: Logits, batch: TrainBatch) -> torch.Tensor:
        """Negative log-likelihood of the batch's response tokens (nats/token)."""
        return masked_cross_entropy(logits, batch.labels, batch.label_mask)

    def divergence(self, name: str, trainable: Logits, target: Target, batch: TrainBatch, *,
                   temperature: float = 1.0, **params: float) -> torch.Tensor:
        """Registered divergence ``name`` between the trainable logits and the
        target (logits (B, T-1, V), response logits or a top-k signal), averaged over response tokens."""
        return masked_divergence(registry().divergences[name], trainable, target, batch.label_mask,
                                 temperature=temperature, **params)

    def token_divergences(self, name: str, trainable: Logits, target: Target, batch: TrainBatch, *,
                          temperature: float = 1.0, **params: float) -> torch.Tensor:
        """Registered divergence ``name`` at each response token (N,), in nats,
        in row-major order of ``batch.label_mask``; its mean is :meth:`divergence`."""
        return masked_token_divergences(registry().divergences[name], trainable, target, batch.label_mask,
                                        temperature=temperature, **params)

    def loss(self, trainable: Logits, batch: TrainBatch, terms: dict[str, LossTerm]) -> dict[str, torch.Tensor]:
        """``loss``: the sum of the terms' weighted means over the response tokens, and each term's mean
        (detached) under its name, computed in one pass over the trainable logits (see
        :func:`distillkit.engine.losses.masked_objective`)."""
        return masked_objective(trainable, terms, batch.labels, batch.label_mask,
                                lambda name: registry().divergences[name])

    def sample(
        self, model: torch.nn.Module, prompts: list[list[int]], *, prefix_embeds: torch.Tensor | None = None,
        key: tuple[Any, ...] | None = None, guide_model: torch.nn.Module | None = None,
        rule: SamplerRule | None = None, capped_ending: CappedEnding = "open",
    ) -> list[list[int]]:
        """Responses sampled from ``model`` (with ``guide_model`` and its
        per-token ``rule`` if given, see :func:`distillkit.engine.sampling.sample`) with the recipe's
        ``[generation]`` settings, each capped so that its prompt + response
        fits in ``data.max_length`` minus the positions the teacher adapter
        prepends; ``capped_ending`` as in :func:`distillkit.engine.sampling.sample`.

        Each row's randomness is keyed by ``key`` (default: the training seed
        and the step k) and its prompt, so a prompt gets the same sample
        whichever process, micro-batch or batch-mates it has.  A teacher with its own tokenizer cannot be sampled
        from (nor guide the samples): its tokens are not the student's."""
        if self.aligner is not None and self.teacher is not None:
            teacher_model = self.teacher.sampling_inputs()[0]
            if model is teacher_model or guide_model is teacher_model:
                raise DistillkitError(
                    f"method '{self.config.method}' samples from the teacher, whose samples are in its own tokens, "
                    f"not the student's (teacher_signal.alignment = '{self.config.recipe.teacher_signal.alignment}'"
                    "); use a method that trains on dataset or student sequences, or a teacher that shares the "
                    "student's tokenizer")
        room = self.config.recipe.data.max_length - (self.teacher.extra_positions if self.teacher else 0)
        key = (self.config.training.seed, self.step) if key is None else key
        row_keys = [int(fingerprint(*key, prompt), 16) for prompt in prompts]
        if isinstance(model, DistributedDataParallel):  # no gradients here: skip DDP's bookkeeping
            model = model.module
        tokenizer = self.tokenizer
        settings = self.config.recipe.generation
        responses = registry().generation_backends[settings.backend].sample(
            model, prompts, settings, max_length=room, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, vocab_size=self.vocab_size, row_keys=row_keys,
            prefix_embeds=prefix_embeds, guide_model=guide_model, rule=rule, keep_going=self.keep_going,
            capped_ending=capped_ending)
        self.generated_tokens += sum(len(r) for r in responses)
        return responses

    def schedule(self, name: str, **params: float) -> float:
        """Registered schedule ``name`` at the step being taken, k = 1..K
        (``step + 1``), as the algorithm boxes count: PromptKD's
        c_k = 1 - k/K is 1 - 1/K at the first step and 0 at the last
        (gmkim-ai/PromptKD ``train_promptkd.py``: ``base_ratio = global_step /
        total_iters`` with ``global_step`` starting at 1).  A schedule with
        state reads it from :attr:`schedule_states` (created here at its
        first evaluation)."""
        schedule = registry().schedules[name]
        params = {**schedule.params, **params}
        if not schedule.stateful:
            return schedule.value(self.step + 1, self.total_steps, **params)
        if name not in registry().methods[self.config.method].schedules:
            raise DistillkitError(f"method '{self.config.method}' evaluates the schedule '{name}', which keeps "
                                  "state, without declaring it; add it to Method(..., schedules=(...))")
        entry = self.schedule_states.entry(schedule, params)
        return schedule.value(self.step + 1, self.total_steps, entry["state"], **params)

    def update_schedules(self, logs: dict[str, float]) -> None:
        """Advance every stateful schedule evaluated so far past step k =
        ``step`` (just taken), from the step's logged values."""
        for name, entry in self.schedule_states.entries.items():
            update = registry().schedules[name].update
            entry["state"] = update(entry["state"], self.step, self.total_steps, logs, **entry["params"])

    def tokenize_responses(self, examples: ExampleBatch, texts: list[str]) -> list[list[int]]:
        """``texts`` tokenized as the responses of ``examples``' prompts, the
        data pipeline's way (joint with the prompt, EOS appended), each cut
        so that prompt + response fits in ``data.max_length``."""
        generated = [dataclasses.replace(e.example, references=(text,)) for e, text in zip(examples, texts)]
        max_length = self.config.recipe.data.max_length
        # "cut_left" drops no example, so the results stay aligned with ``examples``
        tokenized, _ = tokenize(generated, self.tokenizer, max_prompt_length=max_length - 1, max_length=max_length,
                                long_prompts="cut_left")
        return [t.response_ids[: max_length - len(e.prompt_ids)] for t, e in zip(tokenized, examples)]
