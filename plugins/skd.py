"""SKD: speculative knowledge distillation (Xu et al., ICLR 2025, arXiv 2410.11325, Algorithm 1).

    per token i of each response:  y_i ~ M_s(.|y_<i, x)                    (the student proposes)
        if y_i not in top_K(M_t(.|y_<i, x)):  y_i ~ M_t(.|y_<i, x)        (the teacher replaces it)
    L = mean_i D(M_t || M_s)(y_i | y_<i, x)   on the response tokens of [x ‖ y]   (D = KL, as the reference)

As in google-research/google-research ``speculative_kd/``: ``train/ddp_skd.py``
``main`` (``kd_type = "skd"``) samples with the teacher's ``generate``, the
student as assistant, and ``transformers/utils.py`` ``_speculative_kd_sampling``
accepts a student token when it is in ``torch.topk(p, teacher_k)`` of the
teacher's processed distribution p and otherwise draws a fresh teacher token
from p; ``config/kd_train.yaml``: ``top_k`` 25, ``distance_metric = "kl"``,
i.e. ``nn.KLDivLoss(student_logps, teacher_logps)`` = KL(p || q) per token.
Here this is a rule on the shared sampler (:func:`top_k_replacement`), one
token at a time: the reference drafts 5 student tokens and keeps those up to
the first rejection, which yields the same distribution over sequences (every
kept token is proposed from the final prefix).  The teacher's replacement
uses noise independent of the proposal's (``draw(..., stream=1)``).  The
student starts from its SFT checkpoint and trains in train mode, as the
reference's ``assistant_checkpoint`` (SFT) with ``assistant_model.train()``.
Deviations (docs/fidelity.md, SKD): one ``[generation]`` setting for both
models (the reference samples the student at T 0.5 / top-p 0.5 and the
teacher at T 0.2 / top-p 0.5); the loss on the positions that predict the
response tokens (the reference's slice ``logits[0, prompt_len:]`` is one
position later); ``kd_type = "mixed_skd"`` (dataset responses half the time)
is not offered.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from distillkit.api import (
    CappedEnding,
    DistillkitError,
    DivergenceName,
    ExampleBatch,
    Method,
    PlanContext,
    PseudoTargetSource,
    SamplerRule,
    SourceFactory,
    SourceFootprint,
    Stage,
    StepContext,
    TrainBatch,
    collate,
    hookimpl,
    require,
)


def top_k_replacement(k: int) -> SamplerRule:
    """The sampler rule of Algorithm 1: the proposal y ~ q (B,) stays where it is
    among the guide's (teacher's) top ``k`` tokens, else a token drawn from p."""

    def rule(scores: torch.Tensor, guide_scores: torch.Tensor, draw: Callable[..., torch.Tensor]) -> torch.Tensor:
        proposed = draw(scores)
        top = guide_scores.topk(min(k, guide_scores.shape[-1]), dim=-1).indices  # (B, k)
        accepted = (top == proposed[:, None]).any(-1)
        return torch.where(accepted, proposed, draw(guide_scores, stream=1))

    return rule


@dataclass(frozen=True)
class SpeculativeOptions:
    """``top_k``: K of the teacher's acceptance set; ``capped_ending``: see
    :func:`distillkit.engine.sampling.sample`."""

    top_k: int = 25
    capped_ending: CappedEnding = "open"

    def __post_init__(self) -> None:
        require(self.top_k >= 1, "top_k", "be >= 1", self.top_k)


def speculative_samples(run: StepContext, **options: Any) -> PseudoTargetSource:
    """``[x ‖ y]`` with y interleaved: student proposals, replaced by the
    teacher's samples outside its top K (``options``: :class:`SpeculativeOptions`)."""
    opts = SpeculativeOptions(**options)
    if run.teacher.sampling_inputs()[1] is not None:
        raise DistillkitError("speculative samples need a plain teacher (no soft prompt); use teacher_adapter 'frozen'")
    rule = top_k_replacement(opts.top_k)

    def make_batch(examples: ExampleBatch) -> TrainBatch:
        prompts = [e.prompt_ids for e in examples]
        teacher = run.teacher.sampling_inputs()[0]
        responses = run.sample(run.student, prompts, guide_model=teacher, rule=rule, capped_ending=opts.capped_ending)
        return collate(prompts, responses, run.tokenizer.pad_token_id)

    return make_batch


def speculative_sampling(plan: PlanContext, options: Any) -> SourceFootprint:
    """Both models sample each micro-batch (two KV caches)."""
    return SourceFootprint(samples_from=("student", "teacher"), batch=plan.micro_batch)


@dataclass(frozen=True)
class SKDOptions:
    top_k: int = 25  # K (speculative_kd/config/kd_train.yaml)
    divergence: DivergenceName = "forward_kl"  # D: distance_metric "kl", KL(p || q)
    capped_ending: CappedEnding = "open"  # a sample cut at its limit (reference: max_new_tokens, left open)

    def __post_init__(self) -> None:
        require(self.top_k >= 1, "top_k", "be >= 1", self.top_k)


def skd_loss(run: StepContext, batch: TrainBatch) -> dict[str, torch.Tensor]:
    opts: SKDOptions = run.options
    divergence = run.divergence(opts.divergence, run.student_response_logits(batch),
                                run.teacher_response_logits(batch), batch)
    return {"loss": divergence, opts.divergence: divergence}


@hookimpl
def distillkit_register_sources() -> list[SourceFactory]:
    return [SourceFactory("speculative", "student proposals, replaced by teacher samples outside its top K",
                          speculative_samples, options=SpeculativeOptions, footprint=speculative_sampling)]


@hookimpl
def distillkit_register_methods() -> list[Method]:
    return [Method(name="skd", description="speculative KD: student tokens outside the teacher's top K resampled "
                   "by the teacher, then KL(p||q)", stages=(Stage("student", skd_loss),), source="speculative",
                   teacher_adapter="frozen", options=SKDOptions, student_init="sft",
                   source_options=lambda o: {"top_k": o.top_k, "capped_ending": o.capped_ending})]
