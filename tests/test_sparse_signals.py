"""Divergences to a sparse teacher signal (``TopKSignal``: the teacher's top-k
log-probabilities plus one tail bucket) against the dense value and against
a naive float64 coarsening written here: every registered divergence, the
plugins' included, is the dense value at k = V; for k < V it is the
divergence of the two distributions reduced to k + 1 outcomes, never above
the dense value for an f-divergence, and for forward KL below it by exactly
P(tail) * KL(P | tail || Q | tail) (the chain rule of KL)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distillkit.api import TopKSignal
from distillkit.engine.losses import masked_divergence, masked_token_divergences
from distillkit.registry import registry
from tests.test_divergences import CASE_IDS, CASES, ref_kl, ref_per_row

F_DIVERGENCES = ["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"]


def top_k_signal(target_logits: torch.Tensor, k: int) -> TopKSignal:
    """The sparse signal of dense target logits (..., V), at temperature 1."""
    logp = torch.log_softmax(target_logits.double(), -1)
    values, indices = logp.topk(k, -1)
    rest = logp.scatter(-1, indices, -math.inf)
    tail = torch.where(torch.isinf(rest).all(-1), -math.inf, torch.logsumexp(rest, -1))
    return TopKSignal(indices, values.float(), tail.float())


def coarse_reference(trainable_logits: torch.Tensor, signal: TopKSignal) -> tuple[torch.Tensor, torch.Tensor]:
    """Both sides reduced to the signal's k tokens + the rest, by plain float64 sums: log-prob rows (N, k + 1)."""
    q = torch.softmax(trainable_logits.double(), -1)
    picked = q.gather(-1, signal.indices)
    trainable = torch.cat([picked, (1.0 - picked.sum(-1, keepdim=True)).clamp(min=0.0)], -1).log()
    target = torch.cat([signal.logprobs.double(), signal.tail.double()[..., None]], -1).log_softmax(-1)
    return trainable, target


def logits(seed: int, rows: int = 6, vocab: int = 40, scale: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=gen) * scale, torch.randn(rows, vocab, generator=gen) * scale


def mask_of(rows: int) -> torch.Tensor:
    return torch.ones(rows, dtype=torch.bool)


@pytest.mark.parametrize("name", registry().divergences.names())
@pytest.mark.parametrize("chunk_size", [4, 1024])
def test_every_registered_divergence_is_the_dense_value_at_k_equal_v(name, chunk_size):
    divergence = registry().divergences[name]
    trainable, target = logits(0)
    trainable.requires_grad_(True)
    mask = mask_of(trainable.shape[0])
    dense = masked_token_divergences(divergence, trainable, target, mask, chunk_size=chunk_size)
    (dense_grad,) = torch.autograd.grad(dense.sum(), trainable)
    sparse = masked_token_divergences(divergence, trainable, top_k_signal(target, target.shape[-1]), mask,
                                      chunk_size=chunk_size)
    (sparse_grad,) = torch.autograd.grad(sparse.sum(), trainable)
    torch.testing.assert_close(sparse, dense, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(sparse_grad, dense_grad, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("name,params", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("k", [1, 5, 20])
def test_values_and_gradients_match_the_naive_coarsening(name, params, k):
    trainable, target = logits(1)
    signal = top_k_signal(target, k)
    trainable = trainable.requires_grad_(True)
    got = masked_token_divergences(registry().divergences[name], trainable, signal, mask_of(6), chunk_size=4,
                                   **params)
    (got_grad,) = torch.autograd.grad(got.sum(), trainable)
    reference_input = trainable.detach().double().requires_grad_(True)
    coarse_trainable, coarse_target = coarse_reference(reference_input, signal)
    # ref_per_row takes logits: log-probabilities are logits of themselves
    expected = ref_per_row(name, coarse_trainable, coarse_target, **params)
    (expected_grad,) = torch.autograd.grad(expected.sum(), reference_input)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got_grad.double(), expected_grad, atol=1e-6, rtol=1e-4)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), k=st.integers(1, 39), name=st.sampled_from(F_DIVERGENCES))
def test_f_divergences_never_exceed_the_dense_value(seed, k, name):
    trainable, target = logits(seed)
    divergence = registry().divergences[name]
    dense = masked_token_divergences(divergence, trainable.double(), target.double(), mask_of(6))
    sparse = masked_token_divergences(divergence, trainable, top_k_signal(target, k), mask_of(6))
    assert (sparse <= dense + 1e-5).all(), (sparse, dense)
    assert (sparse >= -1e-6).all()


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), k=st.integers(1, 39))
def test_forward_kl_gap_is_the_tail_term(seed, k):
    trainable, target = logits(seed)
    signal = top_k_signal(target, k)
    dense = masked_token_divergences(registry().divergences["forward_kl"], trainable, target, mask_of(6))
    sparse = masked_token_divergences(registry().divergences["forward_kl"], trainable, signal, mask_of(6))
    logp, logq = torch.log_softmax(target.double(), -1), torch.log_softmax(trainable.double(), -1)
    in_tail = torch.ones_like(logp, dtype=torch.bool).scatter(-1, signal.indices, False)
    tail_p = torch.where(in_tail, logp, -math.inf)
    tail_q = torch.where(in_tail, logq, -math.inf)
    p_tail = tail_p.logsumexp(-1)
    gap = p_tail.exp() * ref_kl(tail_p - p_tail[:, None], tail_q - tail_q.logsumexp(-1, keepdim=True))
    torch.testing.assert_close((dense - sparse).double(), gap, atol=2e-5, rtol=1e-4)


def test_error_shrinks_as_k_grows():
    """Forward and reverse KL on a peaked teacher: the gap to dense falls with k and is 0 at k = V."""
    trainable, target = logits(2, rows=32, vocab=256, scale=4.0)
    mask = mask_of(32)
    for name in ("forward_kl", "reverse_kl"):
        divergence = registry().divergences[name]
        dense = float(masked_divergence(divergence, trainable, target, mask))
        gaps = [dense - float(masked_divergence(divergence, trainable, top_k_signal(target, k), mask))
                for k in (4, 16, 64, 256)]
        assert gaps[0] > gaps[1] > gaps[2] > 0.0, gaps
        assert abs(gaps[3]) < 1e-4


def test_batched_positions_follow_the_mask():
    """(B, T, ...) inputs: only masked positions are scored, in row-major order, as with dense logits."""
    trainable, target = logits(3, rows=10)
    trainable, target = trainable.view(2, 5, -1), target.view(2, 5, -1)
    mask = torch.tensor([[1, 1, 0, 1, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)
    full = top_k_signal(target, target.shape[-1])
    garbage = TopKSignal(full.indices.clone(), full.logprobs.clone(), full.tail.clone())
    garbage.logprobs[~mask] = 0.0  # rows outside the mask may hold anything
    divergence = registry().divergences["reverse_kl"]
    torch.testing.assert_close(masked_token_divergences(divergence, trainable, garbage, mask),
                               masked_token_divergences(divergence, trainable, target, mask), atol=2e-5, rtol=1e-5)


def test_stored_rounding_is_renormalised():
    """fp16 values (as the cache stores them) still give a proper distribution: finite, near the fp32 value."""
    trainable, target = logits(4)
    signal = top_k_signal(target, 8)
    rounded = TopKSignal(signal.indices, signal.logprobs.half(), signal.tail)
    divergence = registry().divergences["reverse_kl"]
    exact = masked_token_divergences(divergence, trainable, signal, mask_of(6))
    approx = masked_token_divergences(divergence, trainable, rounded, mask_of(6))
    assert torch.isfinite(approx).all()
    torch.testing.assert_close(approx, exact, atol=1e-2, rtol=1e-2)


def test_errors():
    trainable, target = logits(5)
    signal = top_k_signal(target, 4)
    divergence = registry().divergences["forward_kl"]
    with pytest.raises(ValueError, match="temperature-1"):
        masked_token_divergences(divergence, trainable, signal, mask_of(6), temperature=2.0)
    with pytest.raises(ValueError, match="covers positions"):
        masked_token_divergences(divergence, trainable[:3], signal, mask_of(3))


def test_positions_the_signal_does_not_cover_are_left_out():
    """``valid``: uncovered positions give 0 per token and are not counted in the mean."""
    trainable, target = logits(6, rows=8)
    trainable.requires_grad_(True)
    signal = top_k_signal(target, 5)
    valid = torch.tensor([True, False, True, True, False, True, True, True])
    partial = TopKSignal(signal.indices, signal.logprobs, signal.tail, valid)
    divergence = registry().divergences["forward_kl"]
    per_token = masked_token_divergences(divergence, trainable, partial, mask_of(8))
    full = masked_token_divergences(divergence, trainable, signal, mask_of(8))
    assert (per_token[~valid] == 0).all() and torch.equal(per_token[valid], full[valid])
    mean = masked_divergence(divergence, trainable, partial, mask_of(8))
    torch.testing.assert_close(mean, full[valid].mean())
    (grad,) = torch.autograd.grad(mean, trainable)
    assert (grad[~valid] == 0).all() and grad[valid].abs().sum() > 0
