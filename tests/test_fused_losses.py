"""The averaged-loss path (``masked_objective``: values and gradients computed
together chunk by chunk, closed forms where a divergence declares them) on
dense logits and on ``ResponseLogits`` (hidden states + output layer),
against the naive float64 formula of ``test_divergences`` and against the
per-token reference path; and the deferred output layer of a real model."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import transformers

from distillkit.api import LossTerm, ResponseLogits, TopKSignal
from distillkit.builtins.divergences import BUILTIN_DIVERGENCES
from distillkit.engine.losses import (
    masked_cross_entropy,
    masked_divergence,
    masked_objective,
    masked_token_divergences,
    masked_token_logprobs,
)
from distillkit.engine.output_layer import deferred_output_layer, defers_exactly
from tests.test_divergences import CASE_IDS, CASES, DIVS, ref_per_row

AB_CASES = [("ab", {}), ("ab", {"alpha": 1.0, "beta": 0.0}), ("ab", {"alpha": 0.0, "beta": 0.0})]
ALL_CASES = CASES + AB_CASES
ALL_IDS = CASE_IDS + ["ab", "ab-1-0", "ab-0-0"]
B, T, H, V = 2, 7, 6, 13


def ref_ab(trainable, target, alpha, beta):
    lq, lp = torch.log_softmax(trainable.double(), -1), torch.log_softmax(target.double(), -1)
    if (alpha, beta) == (1.0, 0.0):
        return (lp.exp() * (lp - lq)).sum(-1)
    if (alpha, beta) == (0.0, 0.0):
        return 0.5 * (lp - lq).square().sum(-1)
    p, q = lp.exp(), lq.exp()
    s = alpha + beta
    return -(p**alpha * q**beta - alpha / s * p**s - beta / s * q**s).sum(-1) / (alpha * beta)


def reference(name, trainable_rows, target_rows, temperature=1.0, **params):
    if name == "ab":
        full = {**DIVS["ab"].params, **params}
        return ref_ab(trainable_rows / temperature, target_rows / temperature, full["alpha"], full["beta"])
    return ref_per_row(name, trainable_rows, target_rows, temperature, **params)


def setup(seed, bias=True, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    head = torch.nn.Linear(H, V + 3, bias=bias, dtype=torch.float64)  # 3 padded output rows, dropped
    with torch.no_grad():
        head.weight.copy_(torch.randn(V + 3, H, generator=g, dtype=torch.float64))
        if bias:
            head.bias.copy_(torch.randn(V + 3, generator=g, dtype=torch.float64))
    target = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    mask = torch.rand(B, T, generator=g) < 0.7
    mask[0, 1], mask[1, 3] = True, False
    return hidden, head, target, mask


def fused_and_reference(name, params, temperature, chunk_size, seed=0, bias=True):
    """(value, d/hidden, d/weight[, d/bias]) through masked_divergence on ResponseLogits (fp32) and naive fp64."""
    hidden, head, target, mask = setup(seed, bias)
    head32 = torch.nn.Linear(H, V + 3, bias=bias).requires_grad_(True)
    head32.load_state_dict({k: v.float() for k, v in head.state_dict().items()})
    h32 = hidden.float().requires_grad_()
    value = masked_divergence(DIVS[name], ResponseLogits(h32[mask], head32, V), target.float(), mask,
                              temperature=temperature, chunk_size=chunk_size, **params)
    got = (value, *torch.autograd.grad(value, [h32, *head32.parameters()]))
    h64 = hidden.clone().requires_grad_()
    want_value = reference(name, head(h64[mask])[:, :V], target[mask], temperature, **params).mean()
    want = (want_value, *torch.autograd.grad(want_value, [h64, *head.parameters()]))
    return got, want


@pytest.mark.parametrize("name,params", ALL_CASES, ids=ALL_IDS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("chunk_size", [3, None])
def test_response_logits_values_and_gradients_match_the_naive_formula(name, params, temperature, chunk_size):
    got, want = fused_and_reference(name, params, temperature, chunk_size)
    for g, w, what in zip(got, want, ("value", "d/hidden", "d/weight", "d/bias")):
        assert g.dtype == torch.float32, what
        torch.testing.assert_close(g.double(), w, rtol=2e-5, atol=1e-6, msg=f"{what} differs")
    assert all(w.abs().sum() > 0 for w in want[1:])


CLOSED = [(case, case_id) for case, case_id in zip(ALL_CASES, ALL_IDS) if DIVS[case[0]].gradient is not None]


@pytest.mark.parametrize("name,params", [c for c, _ in CLOSED], ids=[i for _, i in CLOSED])
def test_closed_forms_equal_autograd(name, params):
    """Each declared ``Divergence.gradient`` against autograd through its own ``per_token``."""
    divergence = DIVS[name]
    g = torch.Generator().manual_seed(1)
    z = (torch.randn(9, V, generator=g, dtype=torch.float64) * 3).requires_grad_()
    target_logp = torch.log_softmax(torch.randn(9, V, generator=g, dtype=torch.float64) * 3, -1)
    kwargs = {**divergence.params, **params}
    values = divergence.per_token(torch.log_softmax(z, -1), target_logp, **kwargs)
    weights = torch.rand(9, generator=g, dtype=torch.float64)
    (autograd,) = torch.autograd.grad((weights * values).sum(), z)
    closed_values, closed = divergence.gradient(torch.log_softmax(z.detach(), -1), target_logp, **kwargs)
    torch.testing.assert_close(closed_values, values.detach())
    torch.testing.assert_close(weights[:, None] * closed, autograd)


def test_the_builtin_kls_and_jsd_declare_closed_forms():
    closed = {d.name for d in BUILTIN_DIVERGENCES if d.gradient is not None}
    assert {"forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl"} <= closed


@pytest.mark.parametrize("name,params", ALL_CASES, ids=ALL_IDS)
def test_dense_logits_averaged_path_equals_the_per_token_path(name, params):
    """Detached target: the averaged path; its value and gradient are the per-token path's mean."""
    _, _, target, mask = setup(2)
    trainable = (torch.randn(B, T, V, generator=torch.Generator().manual_seed(3)) * 2).requires_grad_()
    fused = masked_divergence(DIVS[name], trainable, target.float(), mask, temperature=1.5, chunk_size=4, **params)
    (grad_fused,) = torch.autograd.grad(fused, trainable)
    per_token = masked_token_divergences(DIVS[name], trainable, target.float(), mask, temperature=1.5,
                                         chunk_size=4, **params).mean()
    (grad_per_token,) = torch.autograd.grad(per_token, trainable)
    torch.testing.assert_close(fused, per_token, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad_fused, grad_per_token, rtol=1e-5, atol=1e-8)
    assert not grad_fused[~mask].any()


def test_shared_inf_columns_fall_back_to_the_masked_formula():
    """A column -inf on both sides: no closed form there, the value and gradient of the reduced vocabulary."""
    _, _, target, mask = setup(4)
    trainable = torch.randn(B, T, V, generator=torch.Generator().manual_seed(5)) * 2
    trainable[..., 2], target[..., 2] = -math.inf, -math.inf
    keep = [v for v in range(V) if v != 2]
    for name in ("forward_kl", "reverse_kl", "jsd"):
        x = trainable.clone().requires_grad_()
        value = masked_divergence(DIVS[name], x, target.float(), mask, chunk_size=3)
        (grad,) = torch.autograd.grad(value, x)
        y = trainable[..., keep].clone().requires_grad_()
        want = masked_divergence(DIVS[name], y, target[..., keep].float(), mask, chunk_size=3)
        (want_grad,) = torch.autograd.grad(want, y)
        torch.testing.assert_close(value, want)
        torch.testing.assert_close(grad[..., keep], want_grad)
        assert not grad[..., 2].any() and torch.isfinite(grad).all()


def test_cross_entropy_on_response_logits_matches_autograd():
    hidden, head, target, mask = setup(6)
    labels = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(7))
    h = hidden.float().requires_grad_()
    head32 = torch.nn.Linear(H, V + 3)
    head32.load_state_dict({k: v.float() for k, v in head.state_dict().items()})
    value = masked_cross_entropy(ResponseLogits(h[mask], head32, V), labels, mask, chunk_size=2)
    got = torch.autograd.grad(value, [h, *head32.parameters()])
    h2 = hidden.float().requires_grad_()
    want_value = F.cross_entropy(head32(h2[mask])[:, :V], labels[mask])
    want = torch.autograd.grad(want_value, [h2, *head32.parameters()])
    torch.testing.assert_close(value, want_value)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)
    logprobs = masked_token_logprobs(ResponseLogits(h[mask], head32, V), labels, mask)
    torch.testing.assert_close(-logprobs.mean(), value)


def test_objective_sums_its_terms_in_one_pass():
    """KD's (1 - r) CE + r KL as one objective = the two helpers combined, values and gradients; the logged
    means are the unweighted ones (also for a zero weight)."""
    hidden, head, target, mask = setup(8)
    labels = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(9))
    head32 = torch.nn.Linear(H, V + 3)
    head32.load_state_dict({k: v.float() for k, v in head.state_dict().items()})
    teacher = ResponseLogits(target.float()[mask], None, V)
    h = hidden.float().requires_grad_()
    student = ResponseLogits(h[mask], head32, V)
    terms = {"ce": LossTerm(0.3), "kl": LossTerm(0.7, "forward_kl", teacher, temperature=2.0),
             "tvd": LossTerm(0.0, "tvd", teacher)}
    out = masked_objective(student, terms, labels, mask, lambda name: DIVS[name], chunk_size=3)
    got = torch.autograd.grad(out["loss"], [h, *head32.parameters()])
    h2 = hidden.float().requires_grad_()
    student2 = ResponseLogits(h2[mask], head32, V)
    ce = masked_cross_entropy(student2, labels, mask)
    kl = masked_divergence(DIVS["forward_kl"], student2, teacher, mask, temperature=2.0)
    want = torch.autograd.grad(0.3 * ce + 0.7 * kl, [h2, *head32.parameters()])
    torch.testing.assert_close(out["loss"], 0.3 * ce + 0.7 * kl)
    torch.testing.assert_close(out["ce"], ce.detach())
    torch.testing.assert_close(out["kl"], kl.detach())
    torch.testing.assert_close(out["tvd"], masked_divergence(DIVS["tvd"], student2, teacher, mask).detach())
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)


def test_sparse_target_on_response_logits_matches_dense_trainable():
    hidden, head, target, mask = setup(10)
    head32 = torch.nn.Linear(H, V + 3)
    head32.load_state_dict({k: v.float() for k, v in head.state_dict().items()})
    logp = torch.log_softmax(target.float(), -1)
    top = logp.topk(4, -1)
    rest = torch.logsumexp(logp.scatter(-1, top.indices, -math.inf), -1)
    valid = torch.rand(B, T, generator=torch.Generator().manual_seed(11)) < 0.8
    signal = TopKSignal(top.indices, top.values, rest, valid)
    h = hidden.float().requires_grad_()
    fused = masked_divergence(DIVS["reverse_kl"], ResponseLogits(h[mask], head32, V), signal, mask, chunk_size=2)
    got = torch.autograd.grad(fused, [h, *head32.parameters()])
    h2 = hidden.float().requires_grad_()
    dense = head32(h2)[..., :V]
    want_value = masked_divergence(DIVS["reverse_kl"], dense, signal, mask)
    want = torch.autograd.grad(want_value, [h2, *head32.parameters()])
    torch.testing.assert_close(fused, want_value)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)


def test_a_target_with_a_gradient_gets_it_through_the_reference_path():
    _, _, target, mask = setup(12)
    trainable = torch.randn(B, T, V).requires_grad_()
    target = target.float().requires_grad_()
    value = masked_divergence(DIVS["jsd"], trainable, target, mask)
    grad_target = torch.autograd.grad(value, target)[0]
    assert grad_target[mask].abs().sum() > 0


def test_no_gradient_mode_and_empty_mask():
    hidden, head, target, mask = setup(13)
    head32 = torch.nn.Linear(H, V + 3)
    h = hidden.float().requires_grad_()
    with torch.no_grad():
        value = masked_divergence(DIVS["jsd"], ResponseLogits(h[mask], head32, V), target.float(), mask)
    assert not value.requires_grad and value > 0
    empty = torch.zeros_like(mask)
    zero = masked_divergence(DIVS["jsd"], ResponseLogits(h[empty], head32, V), target.float(), empty)
    assert zero.item() == 0.0
    zero.backward()
    assert h.grad is not None and not h.grad.any()


def test_row_count_and_vocabulary_mismatches_are_refused():
    hidden, head, target, mask = setup(14)
    head32 = torch.nn.Linear(H, V + 3)
    with pytest.raises(ValueError, match="rows"):
        masked_divergence(DIVS["jsd"], ResponseLogits(hidden.float()[:, :2].reshape(-1, H), head32, V),
                          target.float(), mask)
    with pytest.raises(ValueError, match="vocabulary"):
        masked_divergence(DIVS["jsd"], ResponseLogits(hidden.float()[mask], head32, V - 1), target.float(), mask)


# --- the deferred output layer ----------------------------------------------------------------


def tiny_model(kind):
    if kind == "gpt2":
        config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, bos_token_id=0,
                                         eos_token_id=0)
    elif kind == "llama":
        config = transformers.LlamaConfig(num_hidden_layers=1, hidden_size=16, intermediate_size=32,
                                          num_attention_heads=2, num_key_value_heads=2, vocab_size=50,
                                          bos_token_id=0, eos_token_id=0, pad_token_id=0)
    else:
        config = transformers.Gemma2Config(num_hidden_layers=1, hidden_size=16, intermediate_size=32,
                                           num_attention_heads=2, num_key_value_heads=2, vocab_size=50,
                                           head_dim=8, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()  # no dropout: two passes compared


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_deferred_output_layer_gives_the_models_logits_and_gradients(kind):
    model = tiny_model(kind)
    ids = torch.randint(1, 50, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.rand(2, 8, generator=torch.Generator().manual_seed(1)) < 0.6
    assert defers_exactly(model, ids[:1])
    logits = model(input_ids=ids).logits[:, :-1]
    dense = masked_cross_entropy(logits, ids[:, 1:], mask)
    want = torch.autograd.grad(dense, list(model.parameters()))
    with deferred_output_layer(model) as head:
        hidden = model(input_ids=ids).logits[:, :-1]
    assert hidden.shape == (2, 8, 16)
    fused = masked_cross_entropy(ResponseLogits(hidden[mask], head, 50), ids[:, 1:], mask, chunk_size=3)
    got = torch.autograd.grad(fused, list(model.parameters()))
    torch.testing.assert_close(fused, dense)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    assert not model.get_output_embeddings()._forward_pre_hooks  # the hooks are gone after the block


def test_a_model_that_changes_its_logits_after_the_head_is_not_deferred():
    """Gemma 2 soft-caps its logits after the head: deferring it would drop the cap."""
    assert not defers_exactly(tiny_model("gemma2"), torch.tensor([[1, 2, 3]]))


def test_a_target_made_without_grad_sends_no_gradient_into_its_output_layer():
    """Response logits made under ``no_grad`` (e.g. PromptKD's student as the prompt step's target)
    stay constants: the loss reaches the trainable side only, not the target's trainable head."""
    hidden, head, _, mask = setup(0)
    trainable_head = torch.nn.Linear(H, V + 3, dtype=torch.float64)
    trainable = ResponseLogits(hidden[mask].clone().requires_grad_(), trainable_head, V)
    with torch.no_grad():
        target = ResponseLogits(hidden[mask] * 0.5, head, V)  # head's parameters require grad
    for loss in (masked_divergence(DIVS["reverse_kl"], trainable, target, mask),
                 masked_objective(trainable, {"kl": LossTerm(1.0, "forward_kl", target)}, None, mask,
                                  DIVS.__getitem__)["loss"]):
        loss.backward()
        assert all(p.grad is None for p in head.parameters())
        assert trainable_head.weight.grad is not None and trainable_head.weight.grad.abs().sum() > 0
