"""PromptKD (Kim, Jang, Yang; EMNLP Findings 2024), Algorithm 1.

    for k = 1..K:
        sample requests x;  y ~ q_theta(.|x)  (student, no grad)
        prompt step:   L_prompt  = KL(p(y|P,x) || q_theta(y|x)) + c_k * KL(p(y|P,x) || p(y|x))
                       c_k = (K - k) / K                         (only P is trained)
        student step:  L_student = KL(q_theta(y|x) || p(y|P,x))  (with the updated P)

KL directions are named relative to the trainable side ("reverse" = KL(trainable || target)),
as in the paper's flags; the defaults are the paper's.  Starts from the SFT student.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distillkit import hookimpl
from distillkit.batch import TrainBatch
from distillkit.components import Method, Stage
from distillkit.run import Run

DIRECTIONS = {"reverse": "reverse_kl", "forward": "forward_kl"}


@dataclass(frozen=True)
class PromptKDOptions:
    prompt_length: int = 7
    prompt_init: str = "text"  # "text", "padding" or "random"
    prompt_init_text: str = "Suppose you are a student."
    teacher_adapter_lr: float | None = None  # prompt learning rate; None: training.lr (as in the paper)
    kd_direction: str = "reverse"  # L_kd
    reg_direction: str = "reverse"  # L_reg
    student_direction: str = "reverse"  # L_student: KL(q || p_P)
    use_reg: bool = True
    reg_schedule: str = "linear"  # c_k; "linear" is (K - k) / K
    teacher_dropout_in_prompt_step: bool = True


def _kl(direction: str) -> str:
    if direction not in DIRECTIONS:
        raise ValueError(f"KL direction must be 'reverse' or 'forward', got '{direction}'")
    return DIRECTIONS[direction]


def prompt_loss(run: Run, batch: TrainBatch) -> dict[str, torch.Tensor]:
    opts: PromptKDOptions = run.options
    prompted = run.teacher_logits(batch, grad=True)  # gradient reaches P only
    with torch.no_grad():
        student = run.student_logits(batch)
    l_kd = run.divergence(_kl(opts.kd_direction), prompted, student, batch)
    terms = {"l_kd": l_kd}
    loss = l_kd
    if opts.use_reg:
        plain = run.teacher_logits(batch, adapted=False)
        l_reg = run.divergence(_kl(opts.reg_direction), prompted, plain, batch)
        c_k = run.schedule(opts.reg_schedule)
        loss = loss + c_k * l_reg
        terms.update(l_reg=l_reg, c_k=torch.tensor(c_k))
    return {"loss": loss, **terms}


def student_loss(run: Run, batch: TrainBatch) -> dict[str, torch.Tensor]:
    opts: PromptKDOptions = run.options
    target = run.teacher_logits(batch)  # the updated prompt, no grad
    kl = run.divergence(_kl(opts.student_direction), run.student_logits(batch), target, batch)
    return {"loss": kl}


@hookimpl
def distillkit_register_methods() -> list[Method]:
    return [Method(
        name="promptkd",
        description="student samples; soft prompt on the teacher tuned for the student, then reverse-KL KD",
        stages=(Stage("teacher_adapter", prompt_loss), Stage("student", student_loss)),
        source="student", teacher="soft_prompt", options=PromptKDOptions, student_init="sft",
        teacher_options=lambda o: {"length": o.prompt_length, "init": o.prompt_init, "init_text": o.prompt_init_text,
                                   "train_mode_for_grad": o.teacher_dropout_in_prompt_step},
    )]
