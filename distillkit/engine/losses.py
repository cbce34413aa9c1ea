"""Masked, chunked loss math on logits: the shared numerics under every
divergence and cross-entropy (fp32 ``log_softmax``, response positions only).

Both sides of a loss are logits at the N response positions: dense logits
(B, T, V), gathered at the mask, or :class:`~distillkit.api.ResponseLogits`
(the final hidden states and the output layer, turned into logits here a
chunk of rows at a time).  Two evaluation paths share the per-chunk math:

- a loss averaged over the response tokens (:func:`masked_divergence`,
  :func:`masked_cross_entropy`, :func:`masked_objective`) computes, chunk by
  chunk, the values *and* their gradients with respect to the trainable
  hidden states and output layer, in closed form where the divergence
  declares one (``Divergence.gradient``) and by autograd over the chunk
  otherwise; backward only scales the stored gradients.  One chunk of logits
  is alive at a time, in forward and in backward, and nothing is recomputed;
- per-token values (:func:`masked_token_divergences`,
  :func:`masked_token_logprobs`), whose downstream weights are unknown, run
  each chunk under activation checkpointing (backward recomputes it).  A
  target that itself needs a gradient takes this path too: it is the
  reference the averaged path is tested against.

Shapes: B batch, T positions, V vocabulary, H hidden size, N masked
(response) positions, n rows of a chunk.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch.utils.checkpoint import checkpoint

from distillkit.api.batch import LossTerm, ResponseLogits, TopKSignal

if TYPE_CHECKING:
    from distillkit.api.components import Divergence

MAX_CHUNK_ROWS = 1024
CHUNK_ELEMENTS = 2**22  # logits per chunk (16 MB in fp32): 512 rows at V = 8192, 85 at 49,152, 16 at 262,144


def default_chunk_rows(vocab_size: int) -> int:
    """Rows per chunk at vocabulary size ``vocab_size``: at most :data:`CHUNK_ELEMENTS` logits."""
    return max(1, min(MAX_CHUNK_ROWS, CHUNK_ELEMENTS // max(vocab_size, 1)))


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


def log_rest(logp: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """log of the mass of every token but ``indices`` (N, k), per row of
    log-probabilities (N, V) -> (N, 1); -inf (with zero gradient) where
    ``indices`` cover every token with mass."""
    rest = logp.scatter(-1, indices, -math.inf)
    empty = (rest == -math.inf).all(-1, keepdim=True)  # logsumexp's backward is NaN on an all -inf row
    return torch.where(empty, -math.inf, torch.logsumexp(torch.where(empty, 0.0, rest), -1, keepdim=True))




# --- the two sides of a loss ------------------------------------------------------------

Logits = torch.Tensor | ResponseLogits
Target = torch.Tensor | ResponseLogits | TopKSignal
# A term's value at a chunk: term(z, start, stop, closed) with z the trainable logits (n, V) of rows start:stop
# -> (values (n,), None), differentiable in z; or, when ``closed`` and the term has a closed form, (values, dv/dz).
Term = Callable[[torch.Tensor, int, int, bool], tuple[torch.Tensor, torch.Tensor | None]]


def response_rows(logits: Logits, mask: torch.Tensor) -> ResponseLogits:
    """``logits`` at the N positions of ``mask`` (B, T): dense (B, T, V) ones gathered, ResponseLogits as they are."""
    if isinstance(logits, ResponseLogits):
        expected = int(mask.sum())
        if logits.num_rows != expected:
            raise ValueError(f"the response logits hold {logits.num_rows} rows, the mask {expected} positions")
        return logits
    return ResponseLogits(logits[mask], None, logits.shape[-1])


def _vocab_size(side: Logits) -> int:
    return side.vocab_size if isinstance(side, ResponseLogits) else side.shape[-1]


def _needs_grad(side: Target | None) -> bool:
    if not torch.is_grad_enabled() or side is None:
        return False
    if isinstance(side, TopKSignal):
        return side.logprobs.requires_grad or side.tail.requires_grad
    if isinstance(side, ResponseLogits):
        return side.hidden.requires_grad or side.tracks_grad and any(p.requires_grad for p in _head_parameters(side))
    return side.requires_grad


def _head_parameters(side: ResponseLogits) -> list[torch.nn.Parameter]:
    return [] if side.head is None else list(side.head.parameters())


def _log_softmax(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """fp32 log-softmax of ``logits`` / ``temperature`` over the last dimension."""
    logits = logits.float()
    return torch.log_softmax(logits if temperature == 1.0 else logits / temperature, dim=-1)


def _divergence_term(divergence: Divergence, trainable: Logits, target: Target, mask: torch.Tensor,
                     temperature: float, params: dict[str, float]) -> tuple[Term, torch.Tensor | None]:
    """The divergence to ``target`` as a :data:`Term`, and the positions (N,) it covers (None: all)."""
    unknown = set(params) - set(divergence.params)
    if unknown:
        raise ValueError(f"divergence '{divergence.name}' has no parameter(s) {sorted(unknown)}")
    kwargs = {**divergence.params, **params}
    if isinstance(target, TopKSignal):
        return _sparse_term(divergence, trainable, target, mask, temperature, kwargs)
    if isinstance(trainable, torch.Tensor) and isinstance(target, torch.Tensor) and trainable.shape != target.shape:
        raise ValueError(
            f"trainable and target logits differ in shape: {tuple(trainable.shape)} vs {tuple(target.shape)}")
    if _vocab_size(trainable) != _vocab_size(target):
        raise ValueError(f"trainable and target logits differ in vocabulary: {_vocab_size(trainable)} vs "
                         f"{_vocab_size(target)}")
    target_rows = response_rows(target, mask)

    def term(z: torch.Tensor, start: int, stop: int, closed: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        target_logp = _log_softmax(target_rows.rows(start, stop), temperature)
        if closed and divergence.gradient is not None:
            with torch.no_grad():
                trainable_logp = _log_softmax(z, temperature)
                if bool(torch.isfinite(trainable_logp).all()) and bool(torch.isfinite(target_logp).all()):
                    values, gradient = divergence.gradient(trainable_logp, target_logp, **kwargs)
                    return values, gradient if temperature == 1.0 else gradient.div_(temperature)
        return divergence.per_token(_log_softmax(z, temperature), target_logp, **kwargs), None

    return term, None


def _sparse_term(divergence: Divergence, trainable: Logits, target: TopKSignal, mask: torch.Tensor,
                 temperature: float, kwargs: dict[str, float]) -> tuple[Term, torch.Tensor | None]:
    """The divergence to a top-k signal on the k + 1 outcomes (see :func:`masked_token_divergences`)."""
    if temperature != 1.0:
        raise ValueError(f"a top-k teacher signal holds temperature-1 probabilities, so it cannot be compared at "
                         f"temperature {temperature:g}; use temperature 1 or the dense teacher ([teacher_signal] "
                         "top_k = 0)")
    if isinstance(trainable, torch.Tensor) and target.indices.shape[:-1] != trainable.shape[:-1]:
        raise ValueError(f"the top-k signal covers positions {tuple(target.indices.shape[:-1])}, the trainable "
                         f"logits {tuple(trainable.shape[:-1])}")
    indices, logprobs, tail = target.indices[mask], target.logprobs[mask], target.tail[mask]
    valid = None if target.valid is None else target.valid[mask]

    def term(z: torch.Tensor, start: int, stop: int, closed: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        rows = indices[start:stop]
        trainable_logp = torch.log_softmax(z.float(), dim=-1)
        coarse_trainable = torch.cat([trainable_logp.gather(-1, rows), log_rest(trainable_logp, rows)], -1)
        # renormalised: the stored values are rounded
        coarse_target = torch.log_softmax(torch.cat([logprobs[start:stop].float(),
                                                     tail[start:stop].float()[:, None]], -1), dim=-1)
        values = divergence.per_token(coarse_trainable, coarse_target, **kwargs)
        return (values if valid is None else torch.where(valid[start:stop], values, 0.0)), None

    return term, valid


def _cross_entropy_term(labels: torch.Tensor) -> Term:
    """-log q(label) per row of ``labels`` (N,), with the closed-form gradient softmax(z) - onehot(label)."""

    def term(z: torch.Tensor, start: int, stop: int, closed: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        rows = labels[start:stop]
        if not closed:
            return torch.nn.functional.cross_entropy(z.float(), rows, reduction="none"), None
        with torch.no_grad():
            logp = torch.log_softmax(z.float(), dim=-1)
            gradient = logp.exp()
            gradient[torch.arange(len(rows), device=rows.device), rows] -= 1.0
            return -logp.gather(-1, rows[:, None])[:, 0], gradient

    return term


# --- the two evaluation paths ------------------------------------------------------------


def _chunk_bounds(num_rows: int, chunk_size: int) -> list[tuple[int, int]]:
    return [(start, min(start + chunk_size, num_rows)) for start in range(0, num_rows, chunk_size)]


def per_row_values(trainable: ResponseLogits, term: Term, chunk_size: int | None = None) -> torch.Tensor:
    """``term`` at every row (N,), chunk by chunk under activation checkpointing when gradients are needed."""
    chunk_size = chunk_size or default_chunk_rows(trainable.vocab_size)

    def chunk_values(hidden: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        return term(dataclasses.replace(trainable, hidden=hidden).rows(), start, stop, False)[0]

    bounds = _chunk_bounds(trainable.num_rows, chunk_size)
    if not bounds:
        return trainable.hidden.new_zeros(0, dtype=torch.float32)
    if not torch.is_grad_enabled():
        return torch.cat([chunk_values(trainable.hidden[a:b], a, b) for a, b in bounds])
    return torch.cat([checkpoint(chunk_values, trainable.hidden[a:b], a, b, use_reentrant=False) for a, b in bounds])


def _plain_linear(head: torch.nn.Module | None) -> bool:
    """Whether ``head`` is a bare ``nn.Linear`` (no hooks, e.g. accelerate's offload), whose backward
    :func:`weighted_sum` writes out as two matrix products."""
    return type(head) is torch.nn.Linear and not (head._forward_hooks or head._forward_pre_hooks) \
        and head.weight.device.type != "meta"


def _seed(terms: Sequence[tuple[Term, torch.Tensor, float]], z: torch.Tensor, sums: list[torch.Tensor],
          start: int, stop: int) -> torch.Tensor:
    """d(sum_k c_k sum_i w_ki v_ki)/dz (n, V) fp32 for the chunk's logits ``z``: the terms' closed forms, and
    autograd over the terms that have none; adds each term's sum_i w_ki v_ki to ``sums``."""
    leaf = z.detach().requires_grad_()
    seed, scalar = None, None
    with torch.enable_grad():
        for k, (term, weights, scale) in enumerate(terms):
            w = weights[start:stop]
            values, gradient = term(leaf, start, stop, True)
            sums[k] += (w * values.detach()).sum()
            if gradient is None:
                scalar = scale * (w * values).sum() + (0.0 if scalar is None else scalar)
            else:
                gradient.mul_((scale * w)[:, None])
                seed = gradient if seed is None else seed.add_(gradient)
        if scalar is not None:
            (dz,) = torch.autograd.grad(scalar, leaf)
            seed = dz.float() if seed is None else seed.add_(dz)
    return seed


def _scaled_total(sums: list[torch.Tensor], terms: Sequence[tuple[Term, torch.Tensor, float]]) -> torch.Tensor:
    return sum((scale * s for s, (_, _, scale) in zip(sums, terms)), sums[0].new_zeros(()))


class _PrecomputedGradients(torch.autograd.Function):
    """A scalar whose gradients with respect to ``inputs`` were computed with its value; backward scales them."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, compute: Callable[[], tuple[torch.Tensor, list]],
                *inputs: torch.Tensor) -> torch.Tensor:
        value, gradients = compute()
        ctx.save_for_backward(*gradients)
        return value

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_value: torch.Tensor) -> tuple:
        return (None, *(None if g is None else g * grad_value.to(g.dtype) for g in ctx.saved_tensors))


def weighted_sum(trainable: ResponseLogits, terms: Sequence[tuple[Term, torch.Tensor, float]],
                 chunk_size: int | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """sum_k c_k sum_i w_ki v_ki over the trainable's N rows, for ``terms`` (term k, row weights w_k (N,),
    scale c_k), as one scalar with gradients to ``trainable.hidden`` and its head's parameters, and each
    term's sum_i w_ki v_ki, detached.

    Each chunk's logits are computed once for all the terms, and the gradients with them (the terms' closed
    forms summed into one seed for the head's backward, else autograd over the chunk), so backward does no
    recomputation and keeps no logits."""
    chunk_size = chunk_size or default_chunk_rows(trainable.vocab_size)
    hidden = trainable.hidden
    params = [p for p in _head_parameters(trainable) if p.requires_grad] if torch.is_grad_enabled() else []
    wants_hidden = torch.is_grad_enabled() and hidden.requires_grad
    sums = [hidden.new_zeros((), dtype=torch.float32) for _ in terms]
    if not wants_hidden and not params:
        with torch.no_grad():
            for start, stop in _chunk_bounds(trainable.num_rows, chunk_size):
                z = trainable.rows(start, stop)
                for k, (term, weights, _) in enumerate(terms):
                    sums[k] += (weights[start:stop] * term(z, start, stop, False)[0]).sum()
        return _scaled_total(sums, terms), sums

    def compute() -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        grad_hidden = torch.zeros_like(hidden) if wants_hidden else None
        grad_params = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        linear = _plain_linear(trainable.head)
        for start, stop in _chunk_bounds(trainable.num_rows, chunk_size):
            rows = hidden[start:stop].detach()
            with torch.set_grad_enabled(not linear and trainable.head is not None):
                head_input = rows.requires_grad_(wants_hidden) if not linear and trainable.head is not None else rows
                z = dataclasses.replace(trainable, hidden=head_input).rows()
            seed = _seed(terms, z, sums, start, stop)
            if linear:  # the head's backward by hand: dL/dh = seed W, dL/dW += seed^T h (no logits kept)
                weight = trainable.head.weight[: trainable.vocab_size]
                if wants_hidden:
                    grad_hidden[start:stop] = (seed.to(weight.dtype) @ weight).to(hidden.dtype)
                for total, param in zip(grad_params, params):
                    if param is trainable.head.weight:
                        total[: trainable.vocab_size].addmm_(seed.t(), rows.float())
                    else:  # the bias
                        total[: trainable.vocab_size] += seed.sum(0)
            elif trainable.head is None:
                grad_hidden[start:stop, : trainable.vocab_size] = seed.to(hidden.dtype)
            else:
                wrt = ([head_input] if wants_hidden else []) + params
                grads = torch.autograd.grad(z, wrt, grad_outputs=seed.to(z.dtype), allow_unused=True)
                if wants_hidden:
                    grad_hidden[start:stop] = grads[0]
                for total, grad in zip(grad_params, grads[int(wants_hidden):]):
                    if grad is not None:
                        total += grad
        return _scaled_total(sums, terms), [grad_hidden, *(g.to(p.dtype) for g, p in zip(grad_params, params))]

    inputs = ([hidden] if wants_hidden else []) + params
    return _PrecomputedGradients.apply(compute, *inputs), [s.detach() for s in sums]


# --- the public helpers ---------------------------------------------------------------------


def masked_token_divergences(
    divergence: Divergence,
    trainable_logits: Logits,
    target: Target,
    mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    **params: float,
) -> torch.Tensor:
    """Divergence (N,) fp32, in nats, at each masked position, in row-major
    order of ``mask`` (B, T); ``trainable_logits``: (B, T, V) logits in any
    float dtype or :class:`~distillkit.api.ResponseLogits` at the mask;
    ``target``: the same, or a sparse :class:`~distillkit.api.TopKSignal`
    (B, T, k).  Gradients reach both sides (each chunk recomputed in backward).

    With a sparse target both sides are coarsened to k + 1 outcomes, the
    target's k tokens and one tail bucket (the trainable side's tail is the
    exact mass of its other V - k tokens), and the divergence is taken
    between those two distributions.  That is the dense value when k = V; for
    an f-divergence (KL, JSD, the skew KLs, TVD) it is never larger (data
    processing), and for forward KL the gap is exactly
    ``P(tail) * KL(P | tail || Q | tail)``.  A sparse target is stored at
    temperature 1, so it needs ``temperature = 1``; at masked positions it
    does not cover (``valid`` false) the value is 0."""
    mask = mask.bool()
    term, _ = _divergence_term(divergence, trainable_logits, target, mask, temperature, params)
    return per_row_values(response_rows(trainable_logits, mask), term, chunk_size)


def masked_objective(trainable_logits: Logits, terms: Mapping[str, LossTerm], labels: torch.Tensor | None,
                     mask: torch.Tensor, resolve: Callable[[str], Divergence], *,
                     chunk_size: int | None = None) -> dict[str, torch.Tensor]:
    """``loss`` = sum of ``weight * mean`` over ``terms`` (each a cross-entropy of ``labels`` (B, T) or a
    divergence, named through ``resolve``, averaged over the masked positions it covers), a scalar fp32 with
    gradients to the trainable side only, and each term's mean, detached, under its name; one pass over the
    trainable logits' chunks for all the terms (see :func:`weighted_sum`).  A target that needs a gradient
    is evaluated per token instead (the reference path), so that it gets it."""
    mask = mask.bool()
    trainable = response_rows(trainable_logits, mask)
    built: list[tuple[Term, torch.Tensor, float]] = []
    for term_spec in terms.values():
        if term_spec.divergence is None:
            term, covered = _cross_entropy_term(labels[mask]), None
        else:
            term, covered = _divergence_term(resolve(term_spec.divergence), trainable_logits, term_spec.target,
                                             mask, term_spec.temperature, term_spec.params)
        ones = trainable.hidden.new_ones(trainable.num_rows, dtype=torch.float32)
        covers = ones if covered is None else covered.float()
        built.append((term, covers / covers.sum().clamp(min=1), term_spec.weight))
    if any(_needs_grad(spec.target) for spec in terms.values()):
        means = [(weights * per_row_values(trainable, term, chunk_size)).sum() for term, weights, _ in built]
        return {"loss": _scaled_total(means, built), **{name: mean.detach() for name, mean in zip(terms, means)}}
    loss, means = weighted_sum(trainable, built, chunk_size)
    return {"loss": loss, **dict(zip(terms, means))}


def masked_divergence(
    divergence: Divergence, trainable_logits: Logits, target: Target, mask: torch.Tensor,
    *, temperature: float = 1.0, chunk_size: int | None = None, **params: float,
) -> torch.Tensor:
    """Mean divergence over the masked positions.

    ``trainable_logits``: (B, T, V) in any float dtype or
    :class:`~distillkit.api.ResponseLogits`; ``target``: the same or a
    :class:`~distillkit.api.TopKSignal`; ``mask``: (B, T), true at the
    response positions to score.  Returns a scalar fp32 tensor (nats per
    response token, over the positions a sparse target covers); 0 when the
    mask is empty.
    """
    term = LossTerm(divergence=divergence.name, target=target, temperature=temperature, params=params)
    return masked_objective(trainable_logits, {"value": term}, None, mask, lambda name: divergence,
                            chunk_size=chunk_size)["loss"]


def masked_token_logprobs(logits: Logits, labels: torch.Tensor, mask: torch.Tensor, *,
                          chunk_size: int | None = None) -> torch.Tensor:
    """log-probability (N,) fp32 of each masked label (B, T) under ``logits``
    (B, T, V) or ResponseLogits at the mask, in row-major order of ``mask``;
    chunked like :func:`masked_token_divergences`."""
    mask = mask.bool()
    return -per_row_values(response_rows(logits, mask), _cross_entropy_term(labels[mask]), chunk_size)


def masked_cross_entropy(logits: Logits, labels: torch.Tensor, mask: torch.Tensor, *,
                         chunk_size: int | None = None) -> torch.Tensor:
    """Mean negative log-likelihood of ``labels`` (B, T) under ``logits``
    (B, T, V) or ResponseLogits at the mask, over the masked positions, in nats per token."""
    return masked_objective(logits, {"ce": LossTerm()}, labels, mask, lambda name: None,
                            chunk_size=chunk_size)["loss"]
