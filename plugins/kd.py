"""KD (word-level, Sanh et al. 2019): match the teacher's next-token
distribution at every ground-truth position, mixed with the LM loss.

    L_KD = (1 - kd_ratio) * L_SFT + kd_ratio * mean_t KL(p_t || q_t)

with a true forward KL (teacher entropy included) at ``loss_temperature`` (the
softmax temperature of both sides in the loss; sampling has its own,
``generation.temperature``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distillkit.api import DivergenceName, Method, Stage, StepContext, TrainBatch, hookimpl, require


@dataclass(frozen=True)
class KDOptions:
    kd_ratio: float = 0.5
    loss_temperature: float = 1.0
    divergence: DivergenceName = "forward_kl"

    def __post_init__(self) -> None:
        require(0 <= self.kd_ratio <= 1, "kd_ratio", "be in [0, 1]", self.kd_ratio)
        require(self.loss_temperature > 0, "loss_temperature", "be > 0", self.loss_temperature)


def kd_loss(run: StepContext, batch: TrainBatch) -> dict[str, torch.Tensor]:
    opts: KDOptions = run.options
    student = run.student_logits(batch)
    teacher = run.teacher_logits(batch)
    ce = run.cross_entropy(student, batch)
    kl = run.divergence(opts.divergence, student, teacher, batch, temperature=opts.loss_temperature)
    return {"loss": (1 - opts.kd_ratio) * ce + opts.kd_ratio * kl, "ce": ce, "kl": kl}


@hookimpl
def distillkit_register_methods() -> list[Method]:
    return [Method(name="kd", description="word-level KD: LM loss + forward KL to the teacher on dataset responses",
                   stages=(Stage("student", kd_loss),), source="dataset", teacher_adapter="frozen", options=KDOptions)]
