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
from distillkit.engine.losses import check_mixture_weight, kl_divergence, log_mixture, masked_kl, plain_kl


def forward_kl(trainable_logp: torch.Tensor, target_logp: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) (N, V) -> (N,): mode-covering; used by KD and SeqKD."""
    return kl_divergence(target_logp, trainable_logp)


def reverse_kl(trainable_logp: torch.Tensor, target_logp: torch.Tensor) -> torch.Tensor:
    """KL(Q || P) (N, V) -> (N,): mode-seeking; used by GKD (as in PromptKD), MiniLLM, PromptKD."""
    return kl_divergence(trainable_logp, target_logp)


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
        return combine(kl_divergence, logp if weight_p == 1.0 else logq)
    plain = combine(plain_kl, torch.logaddexp(logp + math.log(weight_p), logq + math.log1p(-weight_p)))
    if bool(torch.isfinite(plain).all()):
        return plain
    return combine(masked_kl, log_mixture(logp, logq, weight_p))


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


def _absent_as_zero(
    term: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], logp: torch.Tensor, logq: torch.Tensor
) -> torch.Tensor:
    """``term(logp, logq).sum(-1)`` (N, V) -> (N,), with the columns that are -inf on both sides dropped
    (double where, as in :func:`masked_kl`); the fast path when no term is non-finite."""
    plain = term(logp, logq).sum(-1)
    if bool(torch.isfinite(plain).all()):
        return plain
    absent = (logp == -math.inf) & (logq == -math.inf)
    logp, logq = torch.where(absent, 0.0, logp), torch.where(absent, 0.0, logq)
    return torch.where(absent, 0.0, term(logp, logq)).sum(-1)


def _ab_one_zero(logp: torch.Tensor, logq: torch.Tensor, alpha: float) -> torch.Tensor:
    """D_AB^(alpha, 0)(p || q) = 1/alpha^2 sum_v [p^a log(p^a / q^a) - p^a + q^a] (N, V) -> (N,), alpha > 0:
    the beta -> 0 limit of the general case (Cichocki, Cruces, Amari 2011, Entropy 13(1):134, its beta = 0 case)."""
    scaled_p, scaled_q = alpha * logp, alpha * logq  # log p^alpha, log q^alpha (unnormalised)
    return (kl_divergence(scaled_p, scaled_q) - scaled_p.exp().sum(-1) + scaled_q.exp().sum(-1)) / alpha**2


def alpha_beta(trainable_logp: torch.Tensor, target_logp: torch.Tensor, alpha: float = 0.2,
               beta: float = 0.7) -> torch.Tensor:
    """The alpha-beta divergence D_AB^(alpha, beta)(P || Q) of ABKD (Wang et al. 2025, arXiv 2505.04560, §4),
    (N, V) -> (N,), alpha, beta >= 0:

        -1/(alpha beta) sum_v [P^alpha Q^beta - alpha/(alpha+beta) P^(alpha+beta) - beta/(alpha+beta) Q^(alpha+beta)]

    as ghwang-s/abkd ``distillation_llm/distillm/losses.py`` ``ab_div`` (teacher P, student Q), computed in log
    space (P^a Q^b = exp(a log P + b log Q): no 0 * inf at -inf columns).  The limits are explicit:
    (1, 0) is ``forward_kl`` and (0, 1) ``reverse_kl`` exactly; beta = 0 and alpha = 0 otherwise are the
    continuous limits 1/a^2 sum [p^a log(p^a/q^a) - p^a + q^a] (and P, Q swapped); (0, 0) is
    1/2 sum (log P - log Q)^2.  Negative parameters (where Cichocki's family also extends) are refused.
    A one-sided zero leaves alpha, beta > 0 finite; the beta = 0 (alpha = 0) limits are +inf where the KL
    they generalise is, and (0, 0) at any one-sided zero.
    """
    if alpha < 0.0 or beta < 0.0:
        raise ValueError(f"the alpha-beta divergence needs alpha, beta >= 0, got alpha={alpha}, beta={beta}")
    if (alpha, beta) == (1.0, 0.0):
        return forward_kl(trainable_logp, target_logp)
    if (alpha, beta) == (0.0, 1.0):
        return reverse_kl(trainable_logp, target_logp)
    if alpha == 0.0 and beta == 0.0:
        return _absent_as_zero(lambda lp, lq: 0.5 * (lp - lq).square(), target_logp, trainable_logp)
    if beta == 0.0:
        return _ab_one_zero(target_logp, trainable_logp, alpha)
    if alpha == 0.0:  # D_AB^(0, beta)(P || Q) = D_AB^(beta, 0)(Q || P)
        return _ab_one_zero(trainable_logp, target_logp, beta)
    total = alpha + beta
    mixed = (alpha * target_logp + beta * trainable_logp).exp()
    own = (alpha / total) * (total * target_logp).exp() + (beta / total) * (total * trainable_logp).exp()
    return (own - mixed).sum(-1) / (alpha * beta)  # -inf columns give exp(-inf) = 0, with zero gradient


# --- closed-form gradients ----------------------------------------------------------
# With Q = softmax(z), a row value D(Q) has dD/dz = Q * (g - <Q, g>) for g = dD/dQ (constants in g cancel).
# Each function below gives g for finite inputs; the core calls the divergence's ``gradient`` only then.


def _through_softmax(trainable_logp: torch.Tensor, dvalue_dq: torch.Tensor) -> torch.Tensor:
    q = trainable_logp.exp()
    return q * (dvalue_dq - (q * dvalue_dq).sum(-1, keepdim=True))


def _with_gradient(per_token: Callable[..., torch.Tensor], dvalue_dq: Callable[..., torch.Tensor]
                   ) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """The ``Divergence.gradient`` of ``per_token``, given dD/dQ (N, V)."""
    def gradient(trainable_logp: torch.Tensor, target_logp: torch.Tensor, **params: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        values = per_token(trainable_logp, target_logp, **params)
        return values, _through_softmax(trainable_logp, dvalue_dq(trainable_logp, target_logp, **params))
    return gradient


def _forward_kl_gradient(trainable_logp: torch.Tensor, target_logp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(P || Q) and its gradient Q - P with respect to the trainable logits."""
    return forward_kl(trainable_logp, target_logp), trainable_logp.exp().sub_(target_logp.exp())


def _reverse_kl_gradient(trainable_logp: torch.Tensor, target_logp: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(Q || P) = <Q, g> and its gradient Q (g - <Q, g>), g = log Q - log P."""
    q, g = trainable_logp.exp(), trainable_logp - target_logp
    values = (q * g).sum(-1)
    return values, g.sub_(values[:, None]).mul_(q)


def _jsd_gradient(trainable_logp: torch.Tensor, target_logp: torch.Tensor, beta: float = 0.5
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """JSD_beta and its gradient Q (g - <Q, g>), g = (1 - beta) (log Q - log M) (the P / M terms of dD/dQ
    cancel); the value is beta <P, log P - log M> + <Q, g>."""
    if beta == 0.0:
        return _forward_kl_gradient(trainable_logp, target_logp)
    if beta == 1.0:
        return _reverse_kl_gradient(trainable_logp, target_logp)
    log_m = torch.logaddexp(target_logp + math.log(beta), trainable_logp + math.log1p(-beta))
    p_term = (target_logp - log_m).mul_(target_logp.exp()).sum(-1)
    g = torch.sub(trainable_logp, log_m, out=log_m).mul_(1.0 - beta)  # log_m is not needed past here
    q = trainable_logp.exp()
    q_g = (q * g).sum(-1)
    return beta * p_term + q_g, g.sub_(q_g[:, None]).mul_(q)


def _skew_forward_dq(trainable_logp: torch.Tensor, target_logp: torch.Tensor, alpha: float = 0.1) -> torch.Tensor:
    """-(1 - alpha) P / M, M = alpha P + (1 - alpha) Q."""
    m = alpha * target_logp.exp() + (1.0 - alpha) * trainable_logp.exp()
    return -(1.0 - alpha) * target_logp.exp() / m


def _skew_reverse_dq(trainable_logp: torch.Tensor, target_logp: torch.Tensor, alpha: float = 0.1) -> torch.Tensor:
    """log Q - log M - alpha Q / M, M = (1 - alpha) P + alpha Q."""
    m = (1.0 - alpha) * target_logp.exp() + alpha * trainable_logp.exp()
    return trainable_logp - m.log() - alpha * trainable_logp.exp() / m


BUILTIN_DIVERGENCES = [
    Divergence("forward_kl", "KL(P||Q), target P, trainable Q (mode-covering)", forward_kl,
               gradient=_forward_kl_gradient),
    Divergence("reverse_kl", "KL(Q||P), trainable Q, target P (mode-seeking)", reverse_kl,
               gradient=_reverse_kl_gradient),
    Divergence("jsd", "generalized JSD(beta); beta=0 forward KL, beta=1 reverse KL", generalized_jsd, {"beta": 0.5},
               gradient=_jsd_gradient),
    Divergence("skew_forward_kl", "KL(P || aP+(1-a)Q) (DistiLLM SKL)", skew_forward_kl, {"alpha": 0.1},
               gradient=_with_gradient(skew_forward_kl, _skew_forward_dq)),
    Divergence("skew_reverse_kl", "KL(Q || (1-a)P+aQ) (DistiLLM SRKL)", skew_reverse_kl, {"alpha": 0.1},
               gradient=_with_gradient(skew_reverse_kl, _skew_reverse_dq)),
    Divergence("tvd", "total variation distance 0.5*sum|P-Q|", total_variation),
    Divergence("ab", "alpha-beta divergence (ABKD); (1,0) forward KL, (0,1) reverse KL", alpha_beta,
               {"alpha": 0.2, "beta": 0.7}),
]


@hookimpl
def distillkit_register_divergences() -> list[Divergence]:
    return BUILTIN_DIVERGENCES
