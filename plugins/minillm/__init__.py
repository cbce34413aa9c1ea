"""MiniLLM (Gu et al., ICLR 2024): policy gradient on the sequence-level
reverse KL, as in the reference code (microsoft/LMOps ``minillm/``).

    every ppo_epochs passes over the buffer: collect rollout_size rollouts
        y ~ (1 - alpha) q_old + alpha p            (teacher-mixed sampling, no grad)
        r_t = clip((log p(y_t) - log q_old(y_t)) / reward_scaling, +-reward_clip)
        w_t = q_old(y_t) / ((1 - alpha) q_old(y_t) + alpha p(y_t))
    per optimizer step, on a minibatch of rollouts and the step's dataset examples:
        A_t    = whiten( sum_{t'>=t} gamma^(t'-t) r_t' / #response tokens from t on )   (length-normalised)
                 (whitened over the micro-batch of every process together)
        rho_t  = exp(log q_theta(y_t) - log q_old(y_t)) * w_t
        L_PG   = mean_t max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps))
        L_SS   = mean_t KL(q_theta(.|y_<t) || p(.|y_<t))     (exact over V: the single-step term)
        L_PT   = (1 - kd_ratio) CE + kd_ratio KL(p || q_theta)   on dataset responses
        L      = L_PG + L_SS + lm_coef * L_PT

The pre-training corpus of the paper (OpenWebText / RoBERTa data) is not
available offline, so L_PT uses the training set's responses.  The student
stays in eval mode (no dropout) as in the reference.  Starts from the SFT student.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from distillkit.api import (
    Logits,
    Method,
    PlanContext,
    SourceFactory,
    Stage,
    StageFootprint,
    StepContext,
    hookimpl,
    require,
)
from distillkit.engine.losses import log_mixture, masked_token_logprobs
from distillkit.plugins.kd import KDOptions, kd_loss
from distillkit.plugins.minillm.rollouts import (
    RolloutBatch,
    RolloutOptions,
    TeacherMixedRollouts,
    check_rollouts,
    rollout_footprint,
)


@dataclass(frozen=True)
class MiniLLMOptions(KDOptions):  # kd_ratio, loss_temperature, divergence: the L_PT term
    # rollout_size, ppo_epochs, teacher_mix: the rollouts source's options, checked there
    rollout_size: int = 256  # rollouts per collection (num_rollouts)
    ppo_epochs: int = 4  # passes over each collection
    teacher_mix: float = 0.2  # alpha
    gamma: float = 0.95
    clip_ratio: float = 0.2  # epsilon
    reward_scaling: float = 0.5
    reward_clip: float = 100.0
    whiten_padding: bool = True  # reference: whitening counts each response as its full padded block
    capped_ending: Literal["open", "eos"] = "open"  # a rollout cut at its limit (reference: left open)
    single_step: bool = True
    lm_coef: float = 1.0
    keep_teacher_logits: bool = True  # False: recompute the teacher per minibatch (less memory)

    def __post_init__(self) -> None:
        super().__post_init__()
        require(0 <= self.gamma <= 1, "gamma", "be in [0, 1]", self.gamma)
        for name in ("clip_ratio", "reward_scaling", "reward_clip"):
            require(getattr(self, name) > 0, name, "be > 0", getattr(self, name))
        require(self.lm_coef >= 0, "lm_coef", "be >= 0", self.lm_coef)


def rewards(batch: RolloutBatch, opts: MiniLLMOptions) -> torch.Tensor:
    """r_t (B, T-1): scaled and clipped log p(y_t) - log q_old(y_t), zero off the response."""
    raw = (batch.teacher_logprobs - batch.old_logprobs) / opts.reward_scaling
    return raw.clamp(-opts.reward_clip, opts.reward_clip) * batch.label_mask


def advantages(rewards: torch.Tensor, mask: torch.Tensor, gamma: float, *, block_width: int = 0,
               global_sum: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> torch.Tensor:
    """Whitened, length-normalised discounted returns (N,) at the masked positions.

    ``rewards`` and ``mask`` (B, T-1).  As the reference (microsoft/LMOps
    ``minillm/minillm/losses.py`` ``_get_advantages_and_returns`` and
    ``utils.py`` ``whiten`` / ``get_global_statistics``): the statistics are
    sums over this micro-batch of every process (``global_sum``), the
    variance is the population one, and with ``block_width`` > 0 each
    response counts as that many entries, zeros past its end (the reference
    pads every rollout to ``max_length - max_prompt_length``,
    ``trainer.py`` ``generate``); 0 counts the response tokens only.
    """
    returns, running = torch.zeros_like(rewards), torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * running
        returns[:, t] = running
    mask = mask.float()
    remaining = (mask.flip(-1).cumsum(-1).flip(-1)).clamp(min=1)  # response tokens from t to the end
    values = (returns / remaining)[mask.bool()].double()
    width = max(block_width, int(mask.sum(-1).max())) if block_width > 0 else 0
    count = float(mask.shape[0] * width) if width else float(values.numel())
    total, entries = global_sum(torch.stack([values.sum(), values.new_tensor(count)])).tolist()
    mean = total / max(entries, 1.0)
    padding = (count - values.numel()) * mean**2  # the zero entries' squared deviations
    (squares,) = global_sum(((values - mean).square().sum() + padding).reshape(1)).tolist()
    return ((values - mean) / math.sqrt(squares / max(entries, 1.0) + 1e-8)).float().detach()


def minillm_loss(run: StepContext, batch: RolloutBatch) -> dict[str, torch.Tensor]:
    opts: MiniLLMOptions = run.options
    mask = batch.label_mask
    student = run.student_response_logits(batch)
    logq = masked_token_logprobs(student, batch.labels, mask)
    old, teacher = batch.old_logprobs[mask], batch.teacher_logprobs[mask]
    w = (old - log_mixture(teacher, old, opts.teacher_mix)).exp()
    ratio = (logq - old).exp() * w
    data = run.config.recipe.data
    advantage = advantages(rewards(batch, opts), mask, opts.gamma, global_sum=run.global_sum,
                           block_width=data.max_length - data.max_prompt_length if opts.whiten_padding else 0)
    clipped = ratio.clamp(1 - opts.clip_ratio, 1 + opts.clip_ratio)
    pg = torch.maximum(-advantage * ratio, -advantage * clipped).mean()
    teacher_logits = batch.teacher_logits if batch.teacher_logits is not None else run.teacher_response_logits(batch)
    single_step = run.divergence("reverse_kl", student, teacher_logits, batch)
    pt = kd_loss(run, batch.lm)
    loss = pg + (single_step if opts.single_step else 0.0) + opts.lm_coef * pt["loss"]
    return {"loss": loss, "pg": pg, "single_step": single_step, "pt": pt["loss"], "pt_ce": pt["ce"], "pt_kl": pt["kl"],
            "reward": (teacher - old).mean(), "w": w.mean(), "clipped": (ratio != clipped).float().mean()}


def minillm_footprint(plan: PlanContext, options: MiniLLMOptions) -> StageFootprint:
    """Beyond a KD stage's chunks: the rollouts' stored teacher logits, scattered to (B, T, V) and gathered
    back for the single-step term (1 full, 1 gathered copy), and the step's LM batch ``[x ‖ y*]`` (L_PT), a
    second student graph."""
    return StageFootprint(extra_logits=Logits(full=1, gathered=1), student_graphs=2)


@hookimpl
def distillkit_register_sources() -> list[SourceFactory]:
    return [SourceFactory("rollouts", "a buffer of teacher-mixed student samples, reused for several passes",
                          TeacherMixedRollouts, options=RolloutOptions, check=check_rollouts,
                          footprint=rollout_footprint)]


@hookimpl
def distillkit_register_methods() -> list[Method]:
    return [Method(
        name="minillm",
        description="policy gradient on reverse KL: teacher-mixed rollouts, PPO clipping, single-step KL, LM loss",
        stages=(Stage("student", minillm_loss, student_mode="eval", footprint=minillm_footprint),),
        source="rollouts", teacher_adapter="frozen", options=MiniLLMOptions, student_init="sft",
        source_options=lambda o: {"size": o.rollout_size, "epochs": o.ppo_epochs, "mix_weight": o.teacher_mix,
                                  "keep_teacher_logits": o.keep_teacher_logits, "capped_ending": o.capped_ending},
    )]
