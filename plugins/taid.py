"""TAID (Shing et al., ICLR 2025, arXiv 2501.16937): temporally adaptive interpolated distillation.

    p_t(.|y<s)  = softmax((1 - t) * sg(logit q_theta(.|y<s)) + t * logit p(.|y<s))     (Sec. 3.1)
    J_TAID      = mean_s KL(p_t || q_theta)                                          on dataset responses
    after step n (Sec. 3.2, Algorithm 1), from the step's objective J_n:
        delta_n = (J_{n-1} - J_n) / (J_{n-1} + eps)            (no update at the first step)
        m_n     = beta * m_{n-1} + (1 - beta) * delta_n
        t_{n+1} = min(t_end, max(t_linear(n), t_n + alpha * sigmoid(m_n) * (1 - t_n)))
        t_linear(n) = t_start + (t_end - t_start) * (n - 1) / K

The reference is SakanaAI/TAID ``src/distil_losses/taid.py`` (``TAID.compute_loss``, ``TAID.update_t``):

- t, the momentum and the previous objective are fp32 scalars (its ``register_buffer`` calls), the
  previous objective starting at +inf so that the first step only records J_1; eps = 1e-15;
- the objective is the code's ``forward_kl(..., teacher_probs=p_t)``: the cross-entropy
  -sum_v p_t(v) log q_theta(v), i.e. KL(p_t || q_theta) + H(p_t).  p_t carries no gradient, so the
  gradients are KL's; the value (which drives delta_n) is the code's.  Terms where the student's
  log-probability is -inf are dropped (its ``masked_fill(..., isinf(logits), 0)``);
- t is updated once per optimizer step, after the loss is computed with the current t; t_linear uses
  the steps done before it (``trainer.global_step / trainer.estimated_stepping_batches``).  Deviation:
  J_n is the step's objective over the global batch (the same in every process), where the code
  updates from each process's micro-batch at every forward, validation included (``src/model.py``
  ``validation_step`` -> ``shard_step`` -> ``loss_fn``); the same with one process, one micro-batch
  per step and no validation in between;
- defaults are ``src/arguments.py``'s (t_start 0.4, t_end 1, alpha 5e-4, beta 0.99); ``scripts/*/taid.sh``
  use t_start 0.4 (Phi-3 teacher) and 0.2 (Llama-2, StableLM); the student starts pre-trained and the
  KD loss is TAID's alone (``distil_ratio`` 1, ``src/loss.py`` ``KDLoss``).

t lives in the stateful schedule ``taid`` (checkpointed with the run, resumed exactly).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from distillkit.api import (
    Divergence,
    Logits,
    Method,
    PlanContext,
    Schedule,
    Stage,
    StageFootprint,
    StepContext,
    TrainBatch,
    hookimpl,
    require,
)
from distillkit.engine.losses import masked_divergence


@dataclass(frozen=True)
class TAIDOptions:
    t_start: float = 0.4
    t_end: float = 1.0
    alpha: float = 5e-4  # the step size of t's adaptive update
    beta: float = 0.99  # the momentum of the objective's relative change

    def __post_init__(self) -> None:  # the reference's asserts, and t_start <= t_end
        require(0 <= self.t_start < 1, "t_start", "be in [0, 1)", self.t_start)
        require(self.t_start <= self.t_end <= 1, "t_end", f"be in [{self.t_start}, 1] (from t_start to 1)", self.t_end)
        require(0 <= self.alpha <= 1, "alpha", "be in [0, 1]", self.alpha)
        require(0 <= self.beta < 1, "beta", "be in [0, 1)", self.beta)


def initial_state(t_start: float, **_: float) -> dict[str, torch.Tensor]:
    """t = t_start, m = 0, J_prev = +inf (fp32 scalars)."""
    return {"t": torch.tensor(t_start, dtype=torch.float32), "momentum": torch.zeros((), dtype=torch.float32),
            "prev_loss": torch.tensor(math.inf, dtype=torch.float32)}


def update(state: dict[str, torch.Tensor], k: int, total: int, logs: dict[str, float], *, t_start: float,
           t_end: float, alpha: float, beta: float) -> dict[str, torch.Tensor]:
    """The state after step k (1..K) whose objective was ``logs["loss"]`` (``TAID.update_t``)."""
    loss = torch.tensor(logs["loss"], dtype=torch.float32)
    if torch.isinf(state["prev_loss"]):
        return {**state, "prev_loss": loss}
    relative_change = (state["prev_loss"] - loss) / (state["prev_loss"] + 1e-15)
    momentum = beta * state["momentum"] + (1 - beta) * relative_change
    t_linear = t_start + (t_end - t_start) * ((k - 1) / total)  # the code's progress = global_step / K
    t = state["t"] + alpha * torch.sigmoid(momentum) * (1 - state["t"])
    return {"t": t.clamp(min=t_linear, max=t_end), "momentum": momentum, "prev_loss": loss}


def value(k: int, total: int, state: dict[str, torch.Tensor], **_: float) -> float:
    """t_k, the interpolation weight of the teacher at step k."""
    return float(state["t"])


def cross_entropy(trainable_logp: torch.Tensor, target_logp: torch.Tensor) -> torch.Tensor:
    """-sum_v p(v) log q(v) per row (N, V) -> (N,), -inf log q(v) terms dropped (the code's ``forward_kl``)."""
    terms = target_logp.exp() * trainable_logp
    return -torch.where(torch.isinf(trainable_logp), 0.0, terms).sum(-1)


CROSS_ENTROPY = Divergence("taid_cross_entropy", "-sum p log q: KL(p || q) + H(p)", cross_entropy)


def taid_loss(run: StepContext, batch: TrainBatch) -> dict[str, torch.Tensor]:
    opts: TAIDOptions = run.options
    t = run.schedule("taid", t_start=opts.t_start, t_end=opts.t_end, alpha=opts.alpha, beta=opts.beta)
    student = run.student_logits(batch)
    target = (1 - t) * student.detach() + t * run.teacher_logits(batch)  # logits of p_t
    loss = masked_divergence(CROSS_ENTROPY, student, target, batch.label_mask)
    return {"loss": loss, "t": torch.tensor(t)}


def interpolation_footprint(plan: PlanContext, options: TAIDOptions) -> StageFootprint:
    """p_t's logits are built dense: the student's, the teacher's and their interpolation (3 full copies),
    gathered at the response positions (2)."""
    return StageFootprint(extra_logits=Logits(full=3, gathered=2))


@hookimpl
def distillkit_register_schedules() -> list[Schedule]:
    return [Schedule("taid", "TAID's t: from t_start, adapted by the loss's relative change, within "
                     "[t_linear, t_end]", value, asdict(TAIDOptions()), initial_state=initial_state, update=update)]


@hookimpl
def distillkit_register_methods() -> list[Method]:
    return [Method(name="taid", description="TAID: KL to a teacher/student interpolation p_t whose t adapts to the "
                   "loss, on dataset responses", stages=(Stage("student", taid_loss, footprint=interpolation_footprint),), source="dataset",
                   teacher_adapter="frozen", options=TAIDOptions, schedules=("taid",))]
