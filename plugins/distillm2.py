"""DistiLLM-2 (Ko et al., ICML 2025, arXiv 2503.07067): contrastive distillation on teacher and student
responses of the same prompts (CALD, Sec. 3).

    per prompt x: y_t ~ p(.|x) (the teacher, sampled once and cached), y_s ~ q_theta(.|x) (the student)
    SKL_alpha(p, q)  = KL(p || alpha p + (1 - alpha) q)                 at every token of [x ‖ y_t]
    SRKL_alpha(p, q) = KL(q || (1 - alpha) p + alpha sg(q))             at every token of [x ‖ y_s]
    L_k = (2 - beta_k) mean SKL_alpha + beta_k mean SRKL_alpha,   beta_k = 1 + (beta_end - 1) min(1, (k-1) / (ramp K))

The equation numbers of the paper could not be checked offline; the formulas follow the official code,
jongwooko/distillm-2 ``src/distillm_trainer.py``:

- ``get_batch_logps`` (``loss_type = "distillm_v2"``): SKL's mixture is ``logsumexp(log a + p, log(1-a) + q)``
  with gradients through q (the built-in ``skew_forward_kl``); SRKL's mixture detaches the student
  (``log a + vocab_logps.detach()``), so its gradient differs from the built-in ``skew_reverse_kl``'s: it is
  the divergence ``distillm2_skew_reverse_kl`` below (same value).  alpha is ``base_alpha_1 = base_alpha_2 = 0.1``.
  The adaptive alpha (``update_alpha``) is off in the code and, if switched on, falls back to 0.1 (its
  anchor is a list of stored metrics, the ``try`` fails into ``alpha = base_alpha``): alpha stays fixed here;
- ``kd_loss``: ``(2 - beta) * chosen_position_kl + beta * rejected_position_kl`` with the curriculum
  ``beta = 1 + 0.5 * min(1, 2 * global_step / max_steps)`` (``gradual_beta``; global_step = k - 1 steps done).
  The released code hard-codes ``gradual_beta = False`` (beta = 1); the default here is the curriculum the
  paper describes (``beta_end = 1.5``, ``ramp = 0.5``); ``beta_end = 1`` gives the code's constant beta;
- deviations: means over the response tokens of each view (the code averages each sequence, then the
  batch: ``average_log_prob=True``, ``losses.mean()``); student responses sampled fresh from the current
  student at each step with the recipe's ``[generation]`` (the code samples the SFT student once before
  training, ``generate/generate_vllm.py``, temperature 0.8); the teacher's are re-tokenized text, as the
  code tokenizes the generated text (``generate/reformat.py``, ``tokenize_row``).  The student starts
  from its SFT checkpoint, as the README recommends.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distillkit.api import (
    Divergence,
    Method,
    PairedBatch,
    PlanContext,
    Schedule,
    Stage,
    StageFootprint,
    StepContext,
    hookimpl,
    require,
)
from distillkit.engine.losses import kl_divergence, log_mixture


@dataclass(frozen=True)
class DistiLLM2Options:
    alpha: float = 0.1  # the skew of both SKL and SRKL (base_alpha_1, base_alpha_2)
    beta_end: float = 1.5  # the weight of SRKL after the ramp; SKL's is 2 - beta
    ramp: float = 0.5  # the fraction of training over which beta rises from 1 to beta_end

    def __post_init__(self) -> None:
        require(0 < self.alpha < 1, "alpha", "be in (0, 1)", self.alpha)
        require(0 <= self.beta_end <= 2, "beta_end", "be in [0, 2] (both weights >= 0)", self.beta_end)
        require(0 < self.ramp <= 1, "ramp", "be in (0, 1]", self.ramp)


def beta(k: int, total: int, end: float = 1.5, ramp: float = 0.5) -> float:
    """beta_k = 1 + (end - 1) * min(1, (k - 1) / (ramp * K)) at step k = 1..K (``kd_loss``'s gradual beta)."""
    done = max(k - 1, 0)  # the code's global_step: steps done before this one
    return 1.0 + (end - 1.0) * min(1.0, done / (ramp * total)) if total > 0 else end


def skew_reverse_kl_detached(trainable_logp: torch.Tensor, target_logp: torch.Tensor,
                             alpha: float = 0.1) -> torch.Tensor:
    """KL(q || (1 - alpha) p + alpha sg(q)) per row (N, V) -> (N,) nats (``get_batch_logps``'s ``ref_pos_kl``)."""
    log_mix = log_mixture(target_logp, trainable_logp.detach(), 1.0 - alpha)
    return kl_divergence(trainable_logp, log_mix)


SKEW_REVERSE_KL = Divergence("distillm2_skew_reverse_kl", "KL(Q || (1 - alpha) P + alpha sg(Q)): skew reverse KL "
                             "without gradient through the mixture's Q (DistiLLM-2)", skew_reverse_kl_detached,
                             {"alpha": 0.1})


def distillm2_loss(run: StepContext, batch: PairedBatch) -> dict[str, torch.Tensor]:
    opts: DistiLLM2Options = run.options
    weight = run.schedule("distillm2_beta", end=opts.beta_end, ramp=opts.ramp)
    skl = run.divergence("skew_forward_kl", run.student_response_logits(batch), run.teacher_signal(batch), batch,
                         alpha=opts.alpha)
    student_view = batch.paired
    srkl = run.divergence(SKEW_REVERSE_KL.name, run.student_response_logits(student_view),
                          run.teacher_response_logits(student_view), student_view, alpha=opts.alpha)
    return {"loss": (2 - weight) * skl + weight * srkl, "skl": skl, "srkl": srkl, "beta": torch.tensor(weight)}


def paired_view_footprint(plan: PlanContext, options: DistiLLM2Options) -> StageFootprint:
    """The student view's graph, on top of a KD stage's (its logits are chunked after the first view's)."""
    return StageFootprint(student_graphs=2)


@hookimpl
def distillkit_register_divergences() -> list[Divergence]:
    return [SKEW_REVERSE_KL]


@hookimpl
def distillkit_register_schedules() -> list[Schedule]:
    return [Schedule("distillm2_beta", "DistiLLM-2's SRKL weight: from 1 to end over the first ramp of training",
                     beta, {"end": 1.5, "ramp": 0.5})]


@hookimpl
def distillkit_register_methods() -> list[Method]:
    return [Method(name="distillm2", description="DistiLLM-2: skew KL on cached teacher responses, skew reverse KL "
                   "on student responses of the same prompts", stages=(Stage("student", distillm2_loss,
                                                                             footprint=paired_view_footprint),),
                   source="teacher_student", teacher_adapter="frozen", options=DistiLLM2Options, student_init="sft",
                   reads_teacher_signal=True)]
