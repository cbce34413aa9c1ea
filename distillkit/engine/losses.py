"""Masked, chunked loss math on logits: the shared numerics under every
divergence and cross-entropy (fp32 ``log_softmax``, response positions only).

:func:`masked_divergence` gathers the response positions, loops over chunks
of ``chunk_size`` rows under activation checkpointing (backward keeps only
each chunk's input logits and recomputes its softmax), and averages over the
response tokens.  Peak extra memory is therefore O(chunk_size * V) instead of
several (B, T, V) fp32 copies.  Shapes: B batch, T positions, V vocabulary,
N masked (response) positions.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch.utils.checkpoint import checkpoint

from distillkit.api.batch import TopKSignal

if TYPE_CHECKING:
    from distillkit.api.components import Divergence

DEFAULT_CHUNK_SIZE = 1024


def check_mixture_weight(weight_p: float) -> None:
    if not 0.0 <= weight_p <= 1.0:
        raise ValueError(f"mixture weight must be in [0, 1], got {weight_p}")


def log_mixture(logp: torch.Tensor, logq: torch.Tensor, weight_p: float) -> torch.Tensor:
    """log(weight_p * P + (1 - weight_p) * Q), elementwise (any shape), with logaddexp.

    -inf where both inputs are -inf, with zero (not NaN) gradient there.
    """
    check_mixture_weight(weight_p)
    if weight_p in (0.0, 1.0):
        return logp if weight_p == 1.0 else logq
    both = (logp == -math.inf) & (logq == -math.inf)  # logaddexp(-inf, -inf) has a NaN gradient
    safe_p, safe_q = torch.where(both, 0.0, logp), torch.where(both, 0.0, logq)
    mixed = torch.logaddexp(safe_p + math.log(weight_p), safe_q + math.log1p(-weight_p))
    return torch.where(both, -math.inf, mixed)


def plain_kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row (N, V) -> (N,), correct only without -inf (any -inf in logp gives NaN)."""
    return (logp.exp() * (logp - logq)).sum(-1)


def masked_kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
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


def kl_divergence(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row from log-probabilities (N, V) -> (N,); see :func:`masked_kl` for -inf and NaN."""
    plain = plain_kl(logp, logq)
    if bool(torch.isfinite(plain).all()):  # no -inf or NaN anywhere in this chunk: the fast path
        return plain
    return masked_kl(logp, logq)


def chunked_rows(
    per_row: Callable[..., torch.Tensor], *rows: torch.Tensor, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> torch.Tensor:
    """``per_row(*rows)`` (N,) computed over row chunks of the (N, ...) tensors ``rows``.

    Each chunk runs under activation checkpointing when gradients are needed,
    so backward keeps only the chunk inputs and recomputes the rest.
    """
    if rows[0].shape[0] <= chunk_size:
        chunks = [rows]
    else:
        chunks = [tuple(r[start : start + chunk_size] for r in rows) for start in range(0, rows[0].shape[0], chunk_size)]
    needs_grad = torch.is_grad_enabled() and any(r.requires_grad for r in rows)
    if not needs_grad or rows[0].shape[0] == 0:
        return torch.cat([per_row(*chunk) for chunk in chunks])
    return torch.cat([checkpoint(per_row, *chunk, use_reentrant=False) for chunk in chunks])


def log_rest(logp: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """log of the mass of every token but ``indices`` (N, k), per row of
    log-probabilities (N, V) -> (N, 1); -inf (with zero gradient) where
    ``indices`` cover every token with mass."""
    rest = logp.scatter(-1, indices, -math.inf)
    empty = (rest == -math.inf).all(-1, keepdim=True)  # logsumexp's backward is NaN on an all -inf row
    return torch.where(empty, -math.inf, torch.logsumexp(torch.where(empty, 0.0, rest), -1, keepdim=True))


def masked_token_divergences(
    divergence: Divergence,
    trainable_logits: torch.Tensor,
    target: torch.Tensor | TopKSignal,
    mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    **params: float,
) -> torch.Tensor:
    """Divergence (N,) fp32, in nats, at each masked position, in row-major
    order of ``mask`` (B, T); ``trainable_logits``: (B, T, V) and ``target``:
    logits of the same shape, in any float dtype, or a sparse
    :class:`~distillkit.api.TopKSignal` (B, T, k).

    With a sparse target both sides are coarsened to k + 1 outcomes, the
    target's k tokens and one tail bucket (the trainable side's tail is the
    exact mass of its other V - k tokens), and the divergence is taken
    between those two distributions.  That is the dense value when k = V; for
    an f-divergence (KL, JSD, the skew KLs, TVD) it is never larger (data
    processing), and for forward KL the gap is exactly
    ``P(tail) * KL(P | tail || Q | tail)``.  A sparse target is stored at
    temperature 1, so it needs ``temperature = 1``; at masked positions it
    does not cover (``valid`` false) the value is 0."""
    unknown = set(params) - set(divergence.params)
    if unknown:
        raise ValueError(f"divergence '{divergence.name}' has no parameter(s) {sorted(unknown)}")
    kwargs = {**divergence.params, **params}
    mask = mask.bool()
    if isinstance(target, TopKSignal):
        return _sparse_token_divergences(divergence, trainable_logits, target, mask, temperature, chunk_size, kwargs)
    if trainable_logits.shape != target.shape:
        raise ValueError(
            f"trainable and target logits differ in shape: {tuple(trainable_logits.shape)} vs {tuple(target.shape)}")

    def per_row(trainable: torch.Tensor, target_rows: torch.Tensor) -> torch.Tensor:
        trainable_logp = torch.log_softmax(trainable.float() / temperature, dim=-1)
        target_logp = torch.log_softmax(target_rows.float() / temperature, dim=-1)
        return divergence.per_token(trainable_logp, target_logp, **kwargs)

    return chunked_rows(per_row, trainable_logits[mask], target[mask], chunk_size=chunk_size)


def _sparse_token_divergences(divergence: Divergence, trainable_logits: torch.Tensor, target: TopKSignal,
                              mask: torch.Tensor, temperature: float, chunk_size: int,
                              kwargs: dict[str, float]) -> torch.Tensor:
    """:func:`masked_token_divergences` to a sparse target (N,)."""
    if temperature != 1.0:
        raise ValueError(f"a top-k teacher signal holds temperature-1 probabilities, so it cannot be compared at "
                         f"temperature {temperature:g}; use temperature 1 or the dense teacher ([teacher_signal] "
                         "top_k = 0)")
    if target.indices.shape[:-1] != trainable_logits.shape[:-1]:
        raise ValueError(f"the top-k signal covers positions {tuple(target.indices.shape[:-1])}, the trainable "
                         f"logits {tuple(trainable_logits.shape[:-1])}")

    def per_row(trainable: torch.Tensor, indices: torch.Tensor, logprobs: torch.Tensor,
                tail: torch.Tensor) -> torch.Tensor:
        trainable_logp = torch.log_softmax(trainable.float(), dim=-1)
        coarse_trainable = torch.cat([trainable_logp.gather(-1, indices), log_rest(trainable_logp, indices)], -1)
        # renormalised: the stored values are rounded
        coarse_target = torch.log_softmax(torch.cat([logprobs.float(), tail.float()[:, None]], -1), dim=-1)
        return divergence.per_token(coarse_trainable, coarse_target, **kwargs)

    values = chunked_rows(per_row, trainable_logits[mask], target.indices[mask], target.logprobs[mask],
                          target.tail[mask], chunk_size=chunk_size)
    return values if target.valid is None else torch.where(target.valid[mask], values, 0.0)


def masked_divergence(
    divergence: Divergence, trainable_logits: torch.Tensor, target: torch.Tensor | TopKSignal, mask: torch.Tensor,
    **options: float,
) -> torch.Tensor:
    """Mean divergence over the masked positions.

    ``trainable_logits``: (B, T, V) in any float dtype; ``target``: logits
    of the same shape or a :class:`~distillkit.api.TopKSignal`; ``mask``:
    (B, T), true at the response positions to score; ``options``: those of
    :func:`masked_token_divergences`.  Returns a scalar fp32 tensor (nats per
    response token, over the positions a sparse target covers); 0 when the
    mask is empty.
    """
    total = masked_token_divergences(divergence, trainable_logits, target, mask, **options).sum()
    covered = mask.bool() if not isinstance(target, TopKSignal) or target.valid is None else mask.bool() & target.valid
    return total / covered.sum().clamp(min=1)


def masked_token_logprobs(
    logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, *, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> torch.Tensor:
    """log-probability (N,) fp32 of each masked label (B, T) under ``logits``
    (B, T, V), in row-major order of ``mask``; chunked like
    :func:`masked_divergence`."""
    mask = mask.bool()

    def per_row(rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return -torch.nn.functional.cross_entropy(rows.float(), targets, reduction="none")

    return chunked_rows(per_row, logits[mask], labels[mask], chunk_size=chunk_size)


def masked_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, *, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> torch.Tensor:
    """Mean negative log-likelihood of ``labels`` (B, T) under ``logits``
    (B, T, V) over the masked positions, in nats per token."""
    logprobs = masked_token_logprobs(logits, labels, mask, chunk_size=chunk_size)
    return -logprobs.sum() / mask.sum().clamp(min=1)
