"""PromptKD (Kim, Jang, Yang; EMNLP Findings 2024), Algorithm 1.

    for k = 1..K:
        sample requests x;  y ~ q_theta(.|x)  (student, no grad)
        prompt step:   L_prompt  = KL(p(y|P,x) || q_theta(y|x)) + c_k * KL(p(y|P,x) || p(y|x))
                       c_k = (K - k) / K                         (only P is trained)
        student step:  L_student = KL(q_theta(y|x) || p(y|P,x))  (with the updated P)

KL directions are named relative to the trainable side ("reverse" = KL(trainable || target)),
as in the paper's flags; the defaults are the paper's.  Starts from the SFT student.

As in the reference (gmkim-ai/PromptKD ``train_promptkd.py``, ``finetune``):
the student target q of the prompt step is computed in eval mode
(``get_distil_loss`` calls ``.eval()`` on it), the prompted teacher with
grad in train mode (``teacher_model.train()``), the student step in train
mode; a student sample cut at its length limit ends with EOS
(``response_ids[:, -1] = pad_token_id``, pad = EOS); c_k is evaluated at
k = 1..K (``base_ratio = global_step / total_iters``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from distillkit.api import LossTerm, Method, ScheduleName, Stage, StepContext, TrainBatch, hookimpl, require

DIRECTIONS = {"reverse": "reverse_kl", "forward": "forward_kl"}
Direction = Literal["reverse", "forward"]


@dataclass(frozen=True)
class PromptKDOptions:
    # the soft prompt's options (m, its init), checked by the soft_prompt adapter
    prompt_length: int = 7
    prompt_init: Literal["text", "padding", "random"] = "text"
    prompt_init_text: str = "Suppose you are a student."
    teacher_adapter_lr: float | None = None  # prompt learning rate; None: training.lr (as in the paper)
    kd_direction: Direction = "reverse"  # L_kd
    reg_direction: Direction = "reverse"  # L_reg
    student_direction: Direction = "reverse"  # L_student: KL(q || p_P)
    use_reg: bool = True
    reg_schedule: ScheduleName = "linear"  # c_k; "linear" is (K - k) / K
    teacher_dropout_in_prompt_step: bool = True
    capped_ending: Literal["eos", "open"] = "eos"  # a student sample cut at its limit: EOS last (reference)

    def __post_init__(self) -> None:
        require(self.teacher_adapter_lr is None or self.teacher_adapter_lr > 0, "teacher_adapter_lr",
                "be > 0 or unset", self.teacher_adapter_lr)


def _kl(direction: Direction) -> str:
    return DIRECTIONS[direction]


def prompt_loss(run: StepContext, batch: TrainBatch) -> dict[str, torch.Tensor]:
    opts: PromptKDOptions = run.options
    prompted = run.teacher_response_logits(batch, grad=True)  # gradient reaches P only
    with torch.no_grad():
        student = run.student_response_logits(batch)  # in eval mode: the stage sets student_mode="eval"
    terms = {"l_kd": LossTerm(1.0, _kl(opts.kd_direction), student)}
    if not opts.use_reg:
        return run.loss(prompted, batch, terms)
    c_k = run.schedule(opts.reg_schedule)
    terms["l_reg"] = LossTerm(c_k, _kl(opts.reg_direction), run.teacher_response_logits(batch, adapted=False))
    return {**run.loss(prompted, batch, terms), "c_k": torch.tensor(c_k)}  # one pass over the prompted logits


def student_loss(run: StepContext, batch: TrainBatch) -> dict[str, torch.Tensor]:
    opts: PromptKDOptions = run.options
    target = run.teacher_response_logits(batch)  # the updated prompt, no grad
    kl = run.divergence(_kl(opts.student_direction), run.student_response_logits(batch), target, batch)
    return {"loss": kl}


@hookimpl
def distillkit_register_methods() -> list[Method]:
    return [Method(
        name="promptkd",
        description="student samples; soft prompt on the teacher tuned for the student, then reverse-KL KD",
        stages=(Stage("teacher_adapter", prompt_loss, student_mode="eval"), Stage("student", student_loss)),
        source="student", teacher_adapter="soft_prompt", options=PromptKDOptions, student_init="sft",
        source_options=lambda o: {"capped_ending": o.capped_ending},
        teacher_adapter_options=lambda o: {"length": o.prompt_length, "init": o.prompt_init,
                                           "init_text": o.prompt_init_text,
                                           "train_mode_for_grad": o.teacher_dropout_in_prompt_step},
    )]
