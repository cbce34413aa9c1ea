"""AKL (Wu et al., "Rethinking Kullback-Leibler Divergence in Knowledge Distillation for Large Language
Models", COLING 2025, arXiv 2404.02657) as a distillkit plugin: a divergence ``akl`` and a method ``akl``.

    L = (1 - kd_ratio) * L_SFT + kd_ratio * mean_t AKL(p_t, q_t)      on dataset responses
    AKL(p, q) = g_head / (g_head + g_tail) * KL(p || q) + g_tail / (g_head + g_tail) * KL(q || p)
    g_head = sum_{v in head} |p(v) - q(v)|,   g_tail = sum_{v in tail} |p(v) - q(v)|

p the teacher, q the student; the head is the teacher's most probable tokens while their cumulative
probability is <= mu (0.5), the top token always, the tail the rest; the weights carry no gradient.

The reference is wutaiqiang/LLM_KD_AKL ``AKL.py`` (``get_ratio`` with ``mu=0.5``, ``get_kl``, ``AKL``),
which its README plugs into the KD loss of microsoft/LMOps ``minillm/finetune.py`` ``get_distil_loss``:
the teacher in eval mode and no grad, ``(1 - kd_ratio) * lm_loss + kd_ratio * distil_loss`` with
``kd_ratio`` 0.5 (LMOps ``scripts/gpt2/kd/kd_base.sh``), the student starting from the pre-trained model.

Registered through the ``distillkit`` entry-point group (``pyproject.toml``); imports only the plugin API
and its shared loss math.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distillkit.api import Divergence, LossTerm, Method, Stage, StepContext, TrainBatch, hookimpl, require
from distillkit.engine.losses import kl_divergence

# --- the divergence -------------------------------------------------------------------------------------


def adaptive_kl(trainable_logp: torch.Tensor, target_logp: torch.Tensor, mu: float = 0.5) -> torch.Tensor:
    """AKL(P, Q) per row of fp32 log-probabilities (N, V) -> (N,) nats, P the target, Q the trainable side.

    As ``AKL.py`` ``get_ratio`` / ``AKL``: the weights are constants (``student_probs ... .detach()``; the
    teacher has no gradient), the first sorted token is always head (``mask[:, :, 0] = False``).
    Deviations: -inf columns have probability 0 (``get_ratio`` sets -inf logits to 0 before its softmax,
    which gives them mass), and a row with g = 0 (P = Q, both KLs 0) weighs each KL by 1/2, not 0/0 = NaN.
    """
    if not 0.0 <= mu <= 1.0:
        raise ValueError(f"AKL needs 0 <= mu <= 1, got {mu}")
    with torch.no_grad():
        target_probs, order = target_logp.exp().sort(dim=-1, descending=True)
        errors = (target_probs - trainable_logp.exp().gather(-1, order)).abs()
        tail = target_probs.cumsum(-1) > mu
        tail[:, 0] = False
        head_gap, tail_gap = errors.masked_fill(tail, 0.0).sum(-1), errors.masked_fill(~tail, 0.0).sum(-1)
        gap = head_gap + tail_gap
        head_weight = torch.where(gap > 0, head_gap / gap, 0.5)
        tail_weight = torch.where(gap > 0, tail_gap / gap, 0.5)
    forward = kl_divergence(target_logp, trainable_logp)  # KL(P || Q): get_kl(teacher_logits, logits)
    reverse = kl_divergence(trainable_logp, target_logp)  # KL(Q || P): get_kl(logits, teacher_logits)
    return head_weight * forward + tail_weight * reverse


# --- the method -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AKLOptions:
    """The recipe's ``[methods.akl]`` section; the defaults are the reference's."""

    mu: float = 0.5  # the head's share of the teacher's mass (get_ratio's default)
    kd_ratio: float = 0.5  # LMOps scripts/gpt2/kd/kd_base.sh --kd-ratio
    loss_temperature: float = 1.0

    def __post_init__(self) -> None:
        require(0 <= self.mu <= 1, "mu", "be in [0, 1]", self.mu)
        require(0 <= self.kd_ratio <= 1, "kd_ratio", "be in [0, 1]", self.kd_ratio)
        require(self.loss_temperature > 0, "loss_temperature", "be > 0", self.loss_temperature)


def akl_loss(run: StepContext, batch: TrainBatch) -> dict[str, torch.Tensor]:
    """(1 - kd_ratio) * CE + kd_ratio * AKL, each in nats per response token."""
    opts: AKLOptions = run.options
    teacher = run.teacher_signal(batch)  # response logits, or a cached top-k signal ([teacher_signal] top_k)
    return run.loss(run.student_response_logits(batch), batch, {
        "ce": LossTerm(1 - opts.kd_ratio),
        "akl": LossTerm(opts.kd_ratio, "akl", teacher, temperature=opts.loss_temperature, params={"mu": opts.mu})})


# --- the registrations (the hooks distillkit calls at start-up) ------------------------------------------


@hookimpl
def distillkit_register_divergences() -> list[Divergence]:
    return [Divergence("akl", "AKL: forward/reverse KL weighted by the head/tail gap (teacher mass mu)",
                       adaptive_kl, {"mu": 0.5})]


@hookimpl
def distillkit_register_methods() -> list[Method]:
    return [Method(name="akl", description="AKL: LM loss + head/tail-weighted forward and reverse KL on dataset "
                   "responses", stages=(Stage("student", akl_loss),), source="dataset", teacher_adapter="frozen",
                   options=AKLOptions, reads_teacher_signal=True)]
