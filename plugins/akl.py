"""AKL (Wu et al., COLING 2025, arXiv 2404.02657): KD with the adaptive KL divergence.

    L = (1 - kd_ratio) * L_SFT + kd_ratio * mean_t AKL(p_t, q_t)   on dataset responses
    AKL(p, q) = g_head / (g_head + g_tail) * KL(p || q) + g_tail / (g_head + g_tail) * KL(q || p)
    g_head = sum_{v in head} |p(v) - q(v)|,  g_tail = sum_{v in tail} |p(v) - q(v)|

the head being the teacher's most probable tokens up to cumulative probability mu (0.5), the tail the rest;
the weights carry no gradient (the divergence ``akl``, :func:`distillkit.builtins.divergences.adaptive_kl`).

The reference is wutaiqiang/LLM_KD_AKL ``AKL.py`` (``get_ratio`` with ``mu=0.5``, ``get_kl``, ``AKL``),
which its README plugs into the KD loss of microsoft/LMOps ``minillm/finetune.py`` ``get_distil_loss``:
the teacher in eval mode and no grad, ``(1 - kd_ratio) * lm_loss + kd_ratio * distil_loss`` with
``kd_ratio`` 0.5 (LMOps ``scripts/gpt2/kd/kd_base.sh``), the student starting from the pre-trained model,
as distillkit's ``kd``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distillkit.api import Method, Stage, StepContext, TrainBatch, hookimpl, require


@dataclass(frozen=True)
class AKLOptions:
    mu: float = 0.5  # the head's share of the teacher's mass (get_ratio's default)
    kd_ratio: float = 0.5  # LMOps KD scripts
    loss_temperature: float = 1.0

    def __post_init__(self) -> None:
        require(0 <= self.mu <= 1, "mu", "be in [0, 1]", self.mu)
        require(0 <= self.kd_ratio <= 1, "kd_ratio", "be in [0, 1]", self.kd_ratio)
        require(self.loss_temperature > 0, "loss_temperature", "be > 0", self.loss_temperature)


def akl_loss(run: StepContext, batch: TrainBatch) -> dict[str, torch.Tensor]:
    opts: AKLOptions = run.options
    student = run.student_logits(batch)
    teacher = run.teacher_logits(batch)
    ce = run.cross_entropy(student, batch)
    akl = run.divergence("akl", student, teacher, batch, temperature=opts.loss_temperature, mu=opts.mu)
    return {"loss": (1 - opts.kd_ratio) * ce + opts.kd_ratio * akl, "ce": ce, "akl": akl}


@hookimpl
def distillkit_register_methods() -> list[Method]:
    return [Method(name="akl", description="AKL: LM loss + head/tail-weighted forward and reverse KL on dataset "
                   "responses", stages=(Stage("student", akl_loss),), source="dataset", teacher_adapter="frozen",
                   options=AKLOptions)]
