"""ABKD (Wang et al., ICML 2025, arXiv 2505.04560): KD with the alpha-beta divergence.

    L = (1 - kd_ratio) * L_SFT + kd_ratio * mean_t D_AB^(alpha, beta)(p_t || q_t)   on dataset responses
    D_AB^(alpha, beta)(p || q) = -1/(alpha beta) sum_v [p^alpha q^beta - alpha/(alpha+beta) p^(alpha+beta)
                                                         - beta/(alpha+beta) q^(alpha+beta)]

with p the teacher and q the student; (alpha, beta) = (1, 0) is forward KL and (0, 1) reverse KL
(the divergence ``ab``, :func:`distillkit.builtins.divergences.alpha_beta`).

As the reference (ghwang-s/abkd ``distillation_llm``): ``finetune.py`` ``get_distil_loss`` calls
``distillm/losses.py`` ``ab_div(logits, teacher_logits, ..., args.ab_alpha, args.ab_beta)`` with the
teacher in eval mode and no grad, and the training loop mixes ``(1 - kd_ratio) * lm_loss + kd_ratio *
distil_loss``.  ``scripts/gpt2/ab/train_*_1.5B.sh``: ``--type ab``, ``--kd-ratio 1.0``, alpha = 0.2,
beta = 0.7 (``START_ALPHA=0.2``, ``alpha + beta = 0.9``; the OpenLLaMA script: 0.1, 0.8), the student
starting from its SFT checkpoint (``results/gpt2/train/init``, ``scripts/gpt2/init``: 3 epochs of LM
loss).  Those scripts also pass ``--student-gen``, but the loop samples only for the ``mixed`` /
``adaptive`` types, so ``ab`` trains on the dataset responses.  Not followed: the reference adds
``lm_coef`` (1) x the LM loss on an OpenWebText batch (``--lm-data-dir``); distillkit has no
pre-training corpus (docs/fidelity.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distillkit.api import Method, Stage, StepContext, TrainBatch, hookimpl, require
from distillkit.plugins.kd import lm_plus_divergence


@dataclass(frozen=True)
class ABKDOptions:
    alpha: float = 0.2  # scripts/gpt2/ab: START_ALPHA=0.2
    beta: float = 0.7  # alpha + beta = 0.9
    kd_ratio: float = 1.0  # --kd-ratio 1.0: the divergence alone
    loss_temperature: float = 1.0  # ab_div softmaxes the raw logits

    def __post_init__(self) -> None:
        require(self.alpha >= 0, "alpha", "be >= 0", self.alpha)
        require(self.beta >= 0, "beta", "be >= 0", self.beta)
        require(0 <= self.kd_ratio <= 1, "kd_ratio", "be in [0, 1]", self.kd_ratio)
        require(self.loss_temperature > 0, "loss_temperature", "be > 0", self.loss_temperature)


def abkd_loss(run: StepContext, batch: TrainBatch) -> dict[str, torch.Tensor]:
    opts: ABKDOptions = run.options
    return lm_plus_divergence(run, batch, "ab", opts.kd_ratio, temperature=opts.loss_temperature, logged_as="ab",
                              alpha=opts.alpha, beta=opts.beta)


@hookimpl
def distillkit_register_methods() -> list[Method]:
    return [Method(name="abkd", description="ABKD: alpha-beta divergence to the teacher on dataset responses",
                   stages=(Stage("student", abkd_loss),), source="dataset", teacher_adapter="frozen",
                   options=ABKDOptions, student_init="sft", reads_teacher_signal=True)]
