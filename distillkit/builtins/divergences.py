"""Token-level divergences between a trainable distribution Q and a target P.

All values are true divergences in nats (the entropy terms are included, so
they are >= 0 and zero for identical inputs), per row of fp32
log-probabilities (N, V) -> (N,); masking, chunking and averaging over
response tokens are :mod:`distillkit.engine.losses`'.

Names follow the trainable/target roles: ``forward_kl`` is KL(P || Q),
``reverse_kl`` is KL(Q || P), where Q is the side being trained.

-inf logits (zero probabilities).  A column that is -inf on both sides (a
masked token) is exactly as if it were absent from the vocabulary, for the
value and the gradients (which are 0 there).  A one-sided zero follows the
mathematics: KL(A || B) with A(v) > 0 = B(v) is +inf for that row, and a term
with A(v) = 0 is 0 whatever B(v) is; so ``forward_kl`` is +inf where only the
trainable side is -inf and ``reverse_kl`` where only the target is.  The
mixture-based divergences (jsd with 0 < beta < 1, skew KLs with 0 < alpha < 1)
and tvd stay finite, as the mixture has mass wherever either side does.  NaN
inputs give NaN.  A non-finite loss is meant to stop the run (the trainer
checks for it) rather than be hidden; the gradients of a +inf row are not
meaningful.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from distillkit.api import Divergence, hookimpl
from distillkit.engine.losses import check_mixture_weight, log_mixture


def _plain_kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row (N, V) -> (N,), correct only without -inf (any -inf in logp gives NaN)."""
    return (logp.exp() * (logp - logq)).sum(-1)


def _masked_kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row (N, V) -> (N,): terms with p(v) = 0 are 0, p(v) > 0 = q(v) gives +inf, NaN stays NaN.

    Double where: the dropped terms' inputs are replaced too, since backward goes
    through both branches and 0 * inf there would make the row's gradient NaN.
    The same masking as PromptKD's get_distil_loss (gmkim-ai/PromptKD
    train_promptkd.py masks ``teacher_probs * logprobs`` with ``torch.isinf(logits)``)
    and MiniLLM's get_x_entropy / get_entropy (microsoft/LMOps
    minillm/minillm/utils.py mask the inf entries); unlike them a zero q(v) under
    p(v) > 0 gives +inf here instead of a finite value that drops the term.
    """
    absent = (logp == -math.inf) & ~logq.isnan()
    logp, logq = torch.where(absent, 0.0, logp), torch.where(absent, 0.0, logq)
    return torch.where(absent, 0.0, logp.exp() * (logp - logq)).sum(-1)


def _kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row from log-probabilities (N, V) -> (N,); see :func:`_masked_kl` for -inf and NaN."""
    plain = _plain_kl(logp, logq)
    if bool(torch.isfinite(plain).all()):  # no -inf or NaN anywhere in this chunk: the fast path
        return plain
    return _masked_kl(logp, logq)


def forward_kl(trainable_logp: torch.Tensor, target_logp: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) (N, V) -> (N,): mode-covering; used by KD and SeqKD."""
    return _kl(target_logp, trainable_logp)


def reverse_kl(trainable_logp: torch.Tensor, target_logp: torch.Tensor) -> torch.Tensor:
    """KL(Q || P) (N, V) -> (N,): mode-seeking; used by GKD (as in PromptKD), MiniLLM, PromptKD."""
    return _kl(trainable_logp, target_logp)


def _kl_to_mixture(
    logp: torch.Tensor, logq: torch.Tensor, weight_p: float, coef_p: float, coef_q: float
) -> torch.Tensor:
    """coef_p * KL(P || M) + coef_q * KL(Q || M) per row (N, V) -> (N,), M = weight_p P + (1 - weight_p) Q.

    Fast path: plain logaddexp and KL.  Where a column is -inf on both sides M is
    too, and logaddexp's backward is NaN there; such a chunk (detected for free:
    the plain KL of a side with a -inf is NaN) is recomputed with the masked ops.
    """
    check_mixture_weight(weight_p)

    def combine(kl: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], log_m: torch.Tensor) -> torch.Tensor:
        terms = [c * kl(side, log_m) for c, side in ((coef_p, logp), (coef_q, logq)) if c != 0.0]
        return terms[0] if len(terms) == 1 else terms[0] + terms[1]

    if weight_p in (0.0, 1.0):  # M is P or Q itself: no logaddexp
        return combine(_kl, logp if weight_p == 1.0 else logq)
    plain = combine(_plain_kl, torch.logaddexp(logp + math.log(weight_p), logq + math.log1p(-weight_p)))
    if bool(torch.isfinite(plain).all()):
        return plain
    return combine(_masked_kl, log_mixture(logp, logq, weight_p))


def generalized_jsd(trainable_logp: torch.Tensor, target_logp: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """beta * KL(P || M) + (1 - beta) * KL(Q || M) with M = beta P + (1 - beta) Q
    (Agarwal et al. 2024, Eq. 1), (N, V) -> (N,).  beta = 0 is forward KL and
    beta = 1 reverse KL exactly (as in TRL); near the endpoints the value shrinks
    towards 0, so the loss scale jumps at beta in {0, 1}."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"generalized JSD needs 0 <= beta <= 1, got {beta}")
    if beta == 0.0:
        return forward_kl(trainable_logp, target_logp)
    if beta == 1.0:
        return reverse_kl(trainable_logp, target_logp)
    return _kl_to_mixture(target_logp, trainable_logp, beta, beta, 1.0 - beta)


def skew_forward_kl(trainable_logp: torch.Tensor, target_logp: torch.Tensor, alpha: float = 0.1) -> torch.Tensor:
    """KL(P || alpha P + (1 - alpha) Q) (DistiLLM's SKL), (N, V) -> (N,)."""
    return _kl_to_mixture(target_logp, trainable_logp, alpha, 1.0, 0.0)


def skew_reverse_kl(trainable_logp: torch.Tensor, target_logp: torch.Tensor, alpha: float = 0.1) -> torch.Tensor:
    """KL(Q || (1 - alpha) P + alpha Q) (DistiLLM's SRKL), (N, V) -> (N,)."""
    return _kl_to_mixture(target_logp, trainable_logp, 1.0 - alpha, 0.0, 1.0)


def total_variation(trainable_logp: torch.Tensor, target_logp: torch.Tensor) -> torch.Tensor:
    """0.5 * sum_v |P(v) - Q(v)| (N, V) -> (N,), in [0, 1]; -inf columns need no masking."""
    return 0.5 * (target_logp.exp() - trainable_logp.exp()).abs().sum(-1)


BUILTIN_DIVERGENCES = [
    Divergence("forward_kl", "KL(P||Q), target P, trainable Q (mode-covering)", forward_kl),
    Divergence("reverse_kl", "KL(Q||P), trainable Q, target P (mode-seeking)", reverse_kl),
    Divergence("jsd", "generalized JSD(beta); beta=0 forward KL, beta=1 reverse KL", generalized_jsd, {"beta": 0.5}),
    Divergence("skew_forward_kl", "KL(P || aP+(1-a)Q) (DistiLLM SKL)", skew_forward_kl, {"alpha": 0.1}),
    Divergence("skew_reverse_kl", "KL(Q || (1-a)P+aQ) (DistiLLM SRKL)", skew_reverse_kl, {"alpha": 0.1}),
    Divergence("tvd", "total variation distance 0.5*sum|P-Q|", total_variation),
]


@hookimpl
def distillkit_register_divergences() -> list[Divergence]:
    return BUILTIN_DIVERGENCES
