"""SFT: supervised fine-tuning on the dataset responses (no teacher).

    L_SFT = -(1 / sum m) * sum_t m_t log q_theta(y*_t | x, y*_<t)
"""

from __future__ import annotations

import torch

from distillkit.api import Method, Stage, StepContext, TrainBatch, hookimpl


def sft_loss(run: StepContext, batch: TrainBatch) -> dict[str, torch.Tensor]:
    ce = run.cross_entropy(run.student_response_logits(batch), batch)
    return {"loss": ce}


@hookimpl
def distillkit_register_methods() -> list[Method]:
    return [Method(name="sft", description="supervised fine-tuning on dataset responses",
                   stages=(Stage("student", sft_loss),), source="dataset", teacher_adapter=None)]
