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

from distillkit.api import DivergenceName, LossTerm, Method, Stage, StepContext, TrainBatch, hookimpl, require


@dataclass(frozen=True)
class KDOptions:
    kd_ratio: float = 0.5
    loss_temperature: float = 1.0
    divergence: DivergenceName = "forward_kl"

    def __post_init__(self) -> None:
        require(0 <= self.kd_ratio <= 1, "kd_ratio", "be in [0, 1]", self.kd_ratio)
        require(self.loss_temperature > 0, "loss_temperature", "be > 0", self.loss_temperature)


def lm_plus_divergence(run: StepContext, batch: TrainBatch, divergence: str, kd_ratio: float, *, temperature: float,
                       logged_as: str, **params: float) -> dict[str, torch.Tensor]:
    """(1 - kd_ratio) * CE + kd_ratio * ``divergence`` to the teacher on the
    batch's responses (nats per token); the divergence is logged as ``logged_as``."""
    teacher = run.teacher_signal(batch)  # its response logits, or the cached top-k signal ([teacher_signal] top_k)
    return run.loss(run.student_response_logits(batch), batch, {
        "ce": LossTerm(1 - kd_ratio),
        logged_as: LossTerm(kd_ratio, divergence, teacher, temperature=temperature, params=params)})


def kd_loss(run: StepContext, batch: TrainBatch) -> dict[str, torch.Tensor]:
    opts: KDOptions = run.options
    return lm_plus_divergence(run, batch, opts.divergence, opts.kd_ratio, temperature=opts.loss_temperature,
                              logged_as="kl")


@hookimpl
def distillkit_register_methods() -> list[Method]:
    return [Method(name="kd", description="word-level KD: LM loss + forward KL to the teacher on dataset responses",
                   stages=(Stage("student", kd_loss),), source="dataset", teacher_adapter="frozen", options=KDOptions,
                   reads_teacher_signal=True)]
