"""GKD (Agarwal et al. 2024): on-policy distillation with a generalized JSD.

    per optimizer step: with probability lambda, y ~ q_theta(.|x) (no grad); else y = y*
    L = mean_t JSD_beta(p_t || q_t)   on the response tokens of [x ‖ y]

beta = 0 is forward KL, beta = 1 reverse KL; PromptKD's GKD baseline is
lambda = 1, beta = 1.  Starts from the SFT student.

As in TRL (huggingface/trl ``trl/trainer/gkd_trainer.py``, ``GKDTrainer``):
the student trains without dropout (``GKDConfig.disable_dropout = True``),
and TRL's ``temperature`` is the *sampling* temperature (its
``GenerationConfig``), which here is ``generation.temperature``; the loss
runs at ``loss_temperature`` (TRL calls ``generalized_jsd_loss`` without a
temperature, i.e. 1.0).  TRL flips its coin in ``training_step``, i.e.
per micro-batch; distillkit's ``mixture`` source once per optimizer step
(keyed by the step, the same in every micro-batch and process), so one step
never mixes both kinds of targets.

The teacher is read through ``run.teacher_signal``, so a teacher with another
tokenizer works through ``[teacher_signal] alignment`` (at loss temperature 1);
a cached top-k signal does not, as the mixture's sequences are not fixed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from distillkit.api import Method, Stage, StepContext, TrainBatch, hookimpl, require


@dataclass(frozen=True)
class GKDOptions:
    # lambda, and lambda_k = lambda * schedule(k, K): the mixture source's options, checked there
    on_policy_fraction: float = 0.5
    on_policy_schedule: str = "constant"
    beta: float = 0.5
    loss_temperature: float = 1.0  # softmax temperature of the loss (TRL: 1.0); sampling: generation.temperature
    student_dropout: bool = False  # TRL: disable_dropout = True
    capped_ending: Literal["open", "eos"] = "open"  # a student sample cut at its limit (TRL: left open)

    def __post_init__(self) -> None:
        require(0 <= self.beta <= 1, "beta", "be in [0, 1]", self.beta)
        require(self.loss_temperature > 0, "loss_temperature", "be > 0", self.loss_temperature)


def gkd_loss(run: StepContext, batch: TrainBatch) -> dict[str, torch.Tensor]:
    opts: GKDOptions = run.options
    student = run.student_response_logits(batch)
    teacher = run.teacher_signal(batch)  # response logits, or a top-k signal (a teacher with its own tokenizer: temperature 1)
    jsd = run.divergence("jsd", student, teacher, batch, temperature=opts.loss_temperature, beta=opts.beta)
    return {"loss": jsd, "jsd": jsd}


@hookimpl
def distillkit_register_methods() -> list[Method]:
    return [Method(name="gkd", description="on-policy KD: student samples with prob. lambda, generalized JSD(beta)",
                   stages=(Stage("student", gkd_loss, student_mode=lambda o: "train" if o.student_dropout else "eval"),), source="mixture",
                   teacher_adapter="frozen", options=GKDOptions, student_init="sft",
                   source_options=lambda o: {"fraction": o.on_policy_fraction, "schedule": o.on_policy_schedule,
                                             "capped_ending": o.capped_ending},
                   reads_teacher_signal=True)]
