"""OPD: on-policy distillation with a sampled-token reverse-KL advantage
(Qwen3 technical report, arXiv 2505.09388, section 4.5 "on-policy distillation";
Thinking Machines, "On-Policy Distillation", 2025).

    per optimizer step: y ~ q_theta(.|x)                          (the current student, no grad)
        k_t = log q_theta(y_t | y_<t) - log p(y_t | y_<t)       (sampled reverse KL, no grad)
        A_t = -c * sum_{t'>=t} gamma^(t'-t) k_t'                 (c kl_penalty_coef, gamma kl_discount_factor)
        rho_t = exp(log q_theta(y_t) - log q_sampled(y_t)) = 1   (fresh samples)
        L = -mean_t rho_t A_t                                    (gradient: -mean_t A_t grad log q_theta(y_t))

E_{y_t ~ q}[k_t] = KL(q_t || p_t), so L's value is c times the sampled
per-token reverse KL, and its gradient the REINFORCE gradient of that KL with
the per-token reward -k_t.  The Qwen3 report states the stage in words only
(no equation: the student's samples, its logits aligned with the teacher's by
a KL); the estimator and its settings follow the blog's reference code,
thinking-machines-lab/tinker-cookbook:

- ``tinker_cookbook/distillation/train_on_policy.py`` ``incorporate_kl_penalty``:
  reverse_kl = (sampled_logprobs - teacher_logprobs) * mask, advantages
  ``-kl_penalty_coef * mask * reverse_kl``, discounted with
  ``rl/metrics.py`` ``discounted_future_sum_vectorized`` only when
  ``kl_discount_factor > 0``; ``Config``: coef 1.0, discount 0.0.
- no centring or whitening: the prompt-only environments give reward 0
  (``distillation/datasets.py`` ``PromptOnlyEnv.step``), so the group-centred
  advantages of ``rl/data_processing.py`` ``compute_advantages`` are 0 and
  the KL term is the whole advantage.
- loss ``importance_sampling`` (Tinker docs, "Loss functions"):
  ``-(exp(target_logprobs - sampling_logprobs) * advantages).sum()``.
  Deviations: distillkit averages over response tokens (as every loss here),
  where the sum is larger by the batch's token count; and with gamma > 0
  only response tokens get advantages, while the reference's discounted sums
  also reach the prompt positions (``rl/train.py`` ``remove_mask`` drops the
  mask before the loss, which sums every position).

The student stays in eval mode, so that the trained forward is the policy the
sampler drew from (it samples in eval mode) and rho = 1 holds.  One sample per
prompt (the cookbook's ``group_size`` 4 only matters for centring rewards,
which are 0).  Starts from the SFT student, as the cookbook's recipe starts
from its supervised checkpoint (``recipes/distillation/README.md``).  The exact
per-token reverse KL over the vocabulary is logged next to the estimate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distillkit.api import CappedEnding, Method, Stage, StepContext, TrainBatch, hookimpl, require
from distillkit.engine.losses import masked_token_logprobs


@dataclass(frozen=True)
class OPDOptions:
    kl_penalty_coef: float = 1.0  # c (cookbook Config.kl_penalty_coef)
    kl_discount_factor: float = 0.0  # gamma; 0: per-token advantages (cookbook default)
    capped_ending: CappedEnding = "open"  # a sample cut at its length limit (cookbook: max_tokens, left open)

    def __post_init__(self) -> None:
        require(self.kl_penalty_coef > 0, "kl_penalty_coef", "be > 0", self.kl_penalty_coef)
        require(0 <= self.kl_discount_factor <= 1, "kl_discount_factor", "be in [0, 1]", self.kl_discount_factor)


def discounted_future_sums(values: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """sum_{t'>=t} gamma^(t'-t) v_t' (N,) along each row of ``mask`` (B, T-1),
    for ``values`` (N,) in row-major order of ``mask``; zeros off the mask."""
    rows = torch.zeros(mask.shape, dtype=values.dtype, device=values.device).masked_scatter(mask, values)
    running = torch.zeros_like(rows[:, 0])
    for t in reversed(range(rows.shape[1])):
        running = rows[:, t] + gamma * running
        rows[:, t] = running
    return rows[mask]


def opd_loss(run: StepContext, batch: TrainBatch) -> dict[str, torch.Tensor]:
    opts: OPDOptions = run.options
    mask = batch.label_mask
    student, teacher = run.student_response_logits(batch), run.teacher_response_logits(batch)
    logq = masked_token_logprobs(student, batch.labels, mask)  # (N,), with gradients
    sampled_kl = logq.detach() - masked_token_logprobs(teacher, batch.labels, mask)  # k_t (N,)
    advantage = -opts.kl_penalty_coef * sampled_kl  # A_t (N,)
    if opts.kl_discount_factor > 0:
        advantage = discounted_future_sums(advantage, mask, opts.kl_discount_factor)
    ratio = (logq - logq.detach()).exp()  # 1: the samples are from this very student
    tokens = max(sampled_kl.numel(), 1)
    with torch.no_grad():
        exact_kl = run.token_divergences("reverse_kl", student, teacher, batch)  # (N,), logged only
    return {"loss": -(ratio * advantage).sum() / tokens, "sampled_kl": sampled_kl.sum() / tokens,
            "reverse_kl": exact_kl.sum() / tokens}


@hookimpl
def distillkit_register_methods() -> list[Method]:
    return [Method(name="opd", description="on-policy KD: student samples, per-token advantage -(log q - log p)",
                   stages=(Stage("student", opd_loss, student_mode="eval"),), source="student",
                   teacher_adapter="frozen", options=OPDOptions, student_init="sft",
                   source_options=lambda o: {"capped_ending": o.capped_ending, "plain_sampling": True})]
