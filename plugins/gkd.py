"""GKD (Agarwal et al. 2024): on-policy distillation with a generalized JSD.

    per micro-batch: with probability lambda, y ~ q_theta(.|x) (no grad); else y = y*
    L = mean_t JSD_beta(p_t || q_t)   on the response tokens of [x ‖ y]

beta = 0 is forward KL, beta = 1 reverse KL; PromptKD's GKD baseline is
lambda = 1, beta = 1.  Starts from the SFT student.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distillkit import hookimpl
from distillkit.batch import TrainBatch
from distillkit.components import Method, Stage
from distillkit.run import Run


@dataclass(frozen=True)
class GKDOptions:
    on_policy_fraction: float = 0.5  # lambda
    on_policy_schedule: str = "constant"  # lambda_k = lambda * schedule(k, K)
    beta: float = 0.5
    temperature: float = 1.0


def gkd_loss(run: Run, batch: TrainBatch) -> dict[str, torch.Tensor]:
    opts: GKDOptions = run.options
    student = run.student_logits(batch)
    jsd = run.divergence("jsd", student, run.teacher_logits(batch), batch, temperature=opts.temperature,
                         beta=opts.beta)
    return {"loss": jsd, "jsd": jsd}


@hookimpl
def distillkit_register_methods() -> list[Method]:
    return [Method(name="gkd", description="on-policy KD: student samples with prob. lambda, generalized JSD(beta)",
                   stages=(Stage("student", gkd_loss),), source="mixture", teacher="frozen", options=GKDOptions,
                   source_options=lambda o: {"fraction": o.on_policy_fraction, "schedule": o.on_policy_schedule},
                   student_init="sft")]
