"""MiniLLM's pseudo-target source: a buffer of teacher-mixed student
rollouts, reused for several PPO passes and checkpointed with the run."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from distillkit.api import (
    Buffer,
    CappedEnding,
    DistillkitError,
    ExampleBatch,
    Logits,
    PlanContext,
    SamplerRule,
    SourceFootprint,
    StepContext,
    TrainBatch,
    collate,
    keyed_generator,
    require,
)
from distillkit.engine.losses import masked_token_logprobs

if TYPE_CHECKING:
    from distillkit.config.assembly import RunConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RolloutOptions:
    """``size`` rollouts per collection, served for ``epochs`` passes;
    ``mix_weight`` alpha of the teacher in the sampling mixture."""

    size: int = 256
    epochs: int = 4
    mix_weight: float = 0.2
    keep_teacher_logits: bool = True
    capped_ending: CappedEnding = "open"

    def __post_init__(self) -> None:
        for name in ("size", "epochs"):
            require(getattr(self, name) >= 1, name, "be >= 1", getattr(self, name))
        require(0 <= self.mix_weight <= 1, "mix_weight", "be in [0, 1]", self.mix_weight)


def teacher_mix(weight: float) -> SamplerRule:
    """The sampler rule drawing each token from ``(1 - weight) q + weight p``
    (student q, guide p), mixed in probability space, after the same processors."""

    def rule(scores: torch.Tensor, guide_scores: torch.Tensor, draw: Callable[..., torch.Tensor]) -> torch.Tensor:
        return draw(torch.lerp(scores.softmax(-1), guide_scores.softmax(-1), weight).log())

    return rule


def check_rollouts(config: RunConfig, options: RolloutOptions) -> None:
    """Whole optimizer steps per collection, and plain sampling: the
    rollouts' log-probabilities are of the unfiltered distributions."""
    batch_size = config.training.batch_size
    require(options.size % batch_size == 0, "size", f"be a multiple of training.batch_size ({batch_size}), so "
            "that no optimizer step spans two rollout collections", options.size)
    filtered = config.recipe.generation.plain_sampling_fixes()
    if filtered:
        raise DistillkitError(f"teacher-mixed rollouts ({config.method}) need plain sampling: set "
                              f"{', '.join(filtered)} (their log-probabilities are of the unfiltered distributions)")


def rollout_footprint(plan: PlanContext, options: RolloutOptions) -> SourceFootprint:
    """Each process collects its share of the rollouts, ``generation.batch_size``
    at a time: both models sample (mixed), then one no-grad pass of each
    scores the chunk (2 full and 3 gathered logits copies at its peak); with
    ``keep_teacher_logits`` the teacher's response logits of the share stay
    in CPU RAM, in the teacher's dtype."""
    share = plan.share(options.size)
    buffers = ()
    if options.keep_teacher_logits and plan.teacher is not None:
        teacher = plan.teacher
        buffers = (Buffer("rollout buffer", share * plan.new_tokens * teacher.vocab * teacher.dtype_bytes,
                          f"teacher logits of {share} rollouts x {plan.new_tokens} tokens x {teacher.vocab:,}"),)
    return SourceFootprint(samples_from=("student", "teacher"),
                           batch=min(plan.config.recipe.generation.batch_size, share),
                           scoring=Logits(full=2, gathered=3), buffers=buffers)


@dataclass
class RolloutBatch(TrainBatch):
    """Rollouts ``[x ‖ y]`` plus what was computed when they were sampled.

    ``old_logprobs`` and ``teacher_logprobs`` (B, T-1): log q_old(y_t) of the
    student that sampled and log p(y_t) of the teacher, aligned with
    ``labels`` and zero off the response.  ``teacher_logits`` (B, T-1, V):
    the teacher's logits at response positions (zero elsewhere), or None when
    they were not kept.  ``lm``: the step's dataset examples ``[x ‖ y*]``.
    """

    old_logprobs: torch.Tensor
    teacher_logprobs: torch.Tensor
    teacher_logits: torch.Tensor | None
    lm: TrainBatch


class TeacherMixedRollouts:
    """A rollout buffer (MiniLLM): a source with state, checkpointed by the trainer.

    Every ``epochs`` passes over the buffer it collects ``size`` new rollouts
    (split over the processes of a multi-process run):
    prompts from the training set (a seeded permutation per data epoch),
    responses from the shared sampler drawing each token from
    ``(1 - mix_weight) q + mix_weight p`` (student q, frozen teacher p), then
    one no-grad teacher-forced pass of each model for log q_old(y_t),
    log p(y_t) and, with ``keep_teacher_logits``, the teacher's logits at the
    response positions (so a loss needs no teacher pass over rollouts).
    Each call returns the next ``len(examples)`` rollouts of the current
    shuffled pass as a :class:`RolloutBatch`, with the examples' dataset
    responses as its ``lm`` batch.  ``capped_ending``: see
    :func:`distillkit.engine.sampling.sample` (the reference leaves capped rollouts
    open: microsoft/LMOps ``minillm/minillm/trainer.py`` ``generate``).
    ``options``: :class:`RolloutOptions`, checked with the run by :func:`check_rollouts`.
    """

    def __init__(self, run: StepContext, **options: Any) -> None:
        if run.teacher.sampling_inputs()[1] is not None:
            raise NotImplementedError("teacher-mixed rollouts mix in the plain teacher; an adapter that prepends "
                                      "a prompt would need the prompt in the mix-in model too")
        opts = RolloutOptions(**options)
        self.run, self.size, self.epochs = run, opts.size, opts.epochs
        self.mix_weight, self.keep_teacher_logits = opts.mix_weight, opts.keep_teacher_logits
        self.capped_ending = opts.capped_ending
        self.collections, self.passes, self.cursor = 0, 0, 0
        self.order: list[int] = []
        self.rollouts: list[dict[str, Any]] = []

    def __call__(self, examples: ExampleBatch) -> RolloutBatch:
        if self.cursor >= len(self.order):
            self._next_pass()
        chosen = [self.rollouts[i] for i in self.order[self.cursor : self.cursor + len(examples)]]
        self.cursor += len(examples)
        batch = collate([r["prompt"] for r in chosen], [r["response"] for r in chosen], self.run.tokenizer.pad_token_id)
        mask = batch.label_mask

        def scatter(key: str) -> torch.Tensor:
            rows = torch.cat([r[key] for r in chosen])
            full = rows.new_zeros((*mask.shape, *rows.shape[1:]))
            full[mask] = rows
            return full

        return RolloutBatch(batch.input_ids, batch.attention_mask, batch.response_mask, scatter("old_logprobs"),
                            scatter("teacher_logprobs"), scatter("teacher_logits") if self.keep_teacher_logits else None,
                            collate([e.prompt_ids for e in examples], [e.response_ids for e in examples],
                                    self.run.tokenizer.pad_token_id))

    def _next_pass(self) -> None:
        if not self.rollouts or self.passes == self.epochs:
            self.rollouts = self._collect()
            self.collections, self.passes = self.collections + 1, 0
        generator = keyed_generator(self.run.config.training.seed, "pass", self.collections, self.passes)
        self.order, self.cursor = torch.randperm(len(self.rollouts), generator=generator).tolist(), 0
        self.passes += 1

    def _prompts(self) -> list[list[int]]:
        """This process's share of the ``size`` prompts of the next collection
        (consecutive slices of one seeded permutation of the training set per
        data epoch; process r of N takes every N-th from the r-th)."""
        examples, seed, run = self.run.train_examples, self.run.config.training.seed, self.run
        first = self.collections * self.size
        permutations = {}
        prompts = []
        for index in range(first + run.process_index, first + self.size, run.num_processes):
            epoch, position = divmod(index, len(examples))
            if epoch not in permutations:
                generator = keyed_generator(seed, "prompts", epoch)
                permutations[epoch] = torch.randperm(len(examples), generator=generator).tolist()
            prompts.append(examples[permutations[epoch][position]].prompt_ids)
        return prompts

    @torch.no_grad()
    def _collect(self) -> list[dict[str, Any]]:
        run, prompts = self.run, self._prompts()
        teacher = run.teacher.sampling_inputs()[0]
        was_training = run.student.training
        run.student.eval()
        rollouts = []
        log.info("collecting %d rollouts (teacher mix-in weight %g)", len(prompts), self.mix_weight)
        for start in range(0, len(prompts), run.config.recipe.generation.batch_size):
            chunk = prompts[start : start + run.config.recipe.generation.batch_size]
            responses = run.sample(run.student, chunk, guide_model=teacher, rule=teacher_mix(self.mix_weight),
                                   capped_ending=self.capped_ending)
            batch = collate(chunk, responses, run.tokenizer.pad_token_id).to(next(teacher.parameters()).device)
            mask = batch.label_mask
            teacher_logits = run.teacher_logits(batch)
            per_token = {
                "old_logprobs": masked_token_logprobs(run.student_logits(batch), batch.labels, mask),
                "teacher_logprobs": masked_token_logprobs(teacher_logits, batch.labels, mask),
            }
            if self.keep_teacher_logits:
                per_token["teacher_logits"] = teacher_logits[mask]
            lengths = mask.sum(-1).tolist()
            split = {key: value.cpu().split(lengths) for key, value in per_token.items()}
            for row, (prompt, response) in enumerate(zip(chunk, responses)):
                rollouts.append({"prompt": prompt, "response": response, **{k: v[row] for k, v in split.items()}})
        run.student.train(was_training)
        return rollouts

    def state_dict(self) -> dict[str, Any]:
        return {"collections": self.collections, "passes": self.passes, "cursor": self.cursor, "order": self.order,
                "rollouts": self.rollouts}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)
