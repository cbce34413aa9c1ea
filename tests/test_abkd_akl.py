"""ABKD's alpha-beta divergence and AKL: the divergences against naive float64
transcriptions of the references (ghwang-s/abkd ``distillm/losses.py``
``ab_div``; wutaiqiang/LLM_KD_AKL ``AKL.py``), their special cases and -inf
conventions, the methods' losses and gradients, per-token values, option
errors at assembly, and end-to-end training with an exact resume."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings

from distillkit.builtins.divergences import adaptive_kl, alpha_beta, forward_kl, reverse_kl
from distillkit.registry import registry
from distillkit.training.pipeline import train

from .conftest import assert_same_tensors, train_killed_during_step
from .test_declarations import _error
from .test_divergences import logp_pairs
from .test_fidelity import TOL, _assert_same_grads, _batch, _grads, _run, _stage_terms, ref_lm_loss


def _logp(rows: int = 6, vocab: int = 11, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.log_softmax(scale * torch.randn(rows, vocab, generator=gen, dtype=torch.float64), -1)


# --- naive transcriptions of the references (float64, probabilities, not logs) ----


def ref_ab(p: torch.Tensor, q: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """ab_div's general case, per row: -sum(p^a q^b - a/(a+b) p^(a+b) - b/(a+b) q^(a+b)) / (a b)."""
    s = alpha + beta
    return -(p**alpha * q**beta - alpha / s * p**s - beta / s * q**s).sum(-1) / (alpha * beta)


def ref_akl(p: torch.Tensor, q: torch.Tensor, mu: float = 0.5) -> torch.Tensor:
    """AKL.py get_ratio + get_kl, per row (teacher p, student q)."""
    sorted_p, idx = p.sort(dim=-1, descending=True)
    errors = (sorted_p - q.gather(-1, idx)).abs()
    tail = sorted_p.cumsum(-1) > mu
    tail[:, 0] = False
    s1, s2 = errors.masked_fill(tail, 0).sum(-1), errors.masked_fill(~tail, 0).sum(-1)
    fkl, rkl = (p * (p.log() - q.log())).sum(-1), (q * (q.log() - p.log())).sum(-1)
    return s1 / (s1 + s2) * fkl + s2 / (s1 + s2) * rkl


# --- the alpha-beta divergence -----------------------------------------------------


@pytest.mark.parametrize(("alpha", "beta"), [(0.2, 0.7), (0.1, 0.8), (0.5, 0.5), (0.8, 0.3), (1.5, 2.0)])
def test_ab_matches_the_reference_general_case(alpha, beta):
    q, p = _logp(seed=1), _logp(seed=2)
    torch.testing.assert_close(alpha_beta(q, p, alpha, beta), ref_ab(p.exp(), q.exp(), alpha, beta))


def test_ab_is_zero_for_identical_inputs_and_non_negative():
    q = _logp(seed=3)
    for alpha, beta in [(0.2, 0.7), (1.0, 0.0), (0.0, 1.0), (0.3, 0.0), (0.0, 0.4), (0.0, 0.0), (2.0, 1.0)]:
        assert alpha_beta(q, q, alpha, beta).abs().max() < 1e-12
        for seed in range(5):
            assert (alpha_beta(q, _logp(seed=10 + seed), alpha, beta) >= -1e-12).all()


def test_ab_reduces_to_forward_and_reverse_kl_exactly_and_is_continuous_at_the_limits():
    q, p = _logp(seed=4).float(), _logp(seed=5).float()
    assert torch.equal(alpha_beta(q, p, 1.0, 0.0), forward_kl(q, p))
    assert torch.equal(alpha_beta(q, p, 0.0, 1.0), reverse_kl(q, p))
    q64, p64 = q.double(), p.double()
    for alpha, beta in [(1.0, 0.0), (0.0, 1.0), (0.4, 0.0), (0.0, 0.6)]:  # the general case tends to each limit
        near = ref_ab(p64.exp(), q64.exp(), alpha + 1e-6, beta + 1e-6)
        torch.testing.assert_close(alpha_beta(q64, p64, alpha, beta), near, rtol=1e-4, atol=1e-6)
    log_ratio = p64 - q64  # (0, 0): 1/2 sum (log p - log q)^2
    torch.testing.assert_close(alpha_beta(q64, p64, 0.0, 0.0), 0.5 * log_ratio.square().sum(-1))


@pytest.mark.parametrize(("alpha", "beta"), [(0.2, 0.7), (0.3, 0.0), (0.0, 0.4), (0.0, 0.0), (1.0, 0.0)])
def test_ab_a_column_minus_inf_on_both_sides_is_absent(alpha, beta):
    q, p = _logp(vocab=8, seed=6).float(), _logp(vocab=8, seed=7).float()
    padded_q = torch.cat([q, torch.full((q.shape[0], 3), -math.inf)], -1).requires_grad_()
    padded_p = torch.cat([p, torch.full((p.shape[0], 3), -math.inf)], -1)
    value = alpha_beta(padded_q, padded_p, alpha, beta)
    torch.testing.assert_close(value, alpha_beta(q, p, alpha, beta))
    (grad,) = torch.autograd.grad(value.sum(), padded_q)
    assert torch.isfinite(grad).all() and (grad[:, 8:] == 0).all()


@settings(max_examples=40, deadline=None)
@given(logp_pairs())
def test_properties_against_the_naive_references(pair):
    """Zero for identical inputs, non-negative, the references' values, AKL between its two KLs."""
    q, p = pair
    for alpha, beta in [(0.2, 0.7), (0.1, 0.8), (1.0, 0.0), (0.0, 1.0), (0.3, 0.0), (0.0, 0.0), (2.0, 0.5)]:
        assert alpha_beta(q, q, alpha, beta).abs().max() < 1e-12
        assert (alpha_beta(q, p, alpha, beta) >= -1e-12).all()
    torch.testing.assert_close(alpha_beta(q, p, 0.2, 0.7), ref_ab(p.exp(), q.exp(), 0.2, 0.7), rtol=1e-7, atol=1e-9)
    assert adaptive_kl(q, q).abs().max() < 1e-12
    value, fkl, rkl = adaptive_kl(q, p), forward_kl(q, p), reverse_kl(q, p)
    assert ((value >= torch.minimum(fkl, rkl) - 1e-12) & (value <= torch.maximum(fkl, rkl) + 1e-12)).all()
    differ = (p.exp() != q.exp()).any(-1)  # where P = Q the reference's weights are 0/0
    if bool((p.exp() > 0).all() and (q.exp() > 0).all()):  # the reference's logs need no zero probabilities
        torch.testing.assert_close(value[differ], ref_akl(p.exp(), q.exp())[differ], rtol=1e-7, atol=1e-9)


def test_ab_refuses_negative_parameters():
    q = _logp()
    with pytest.raises(ValueError, match="alpha, beta >= 0"):
        alpha_beta(q, q, -0.1, 0.5)


# --- AKL -----------------------------------------------------------------------------


@pytest.mark.parametrize("mu", [0.5, 0.0, 0.9])
def test_akl_matches_the_reference(mu):
    q, p = _logp(seed=8), _logp(seed=9)
    torch.testing.assert_close(adaptive_kl(q, p, mu), ref_akl(p.exp(), q.exp(), mu))


def test_akl_weights_carry_no_gradient():
    """AKL.py detaches the student in get_ratio: the gradient is w_head dFKL + w_tail dRKL at fixed weights."""
    q, p = _logp(seed=10).requires_grad_(), _logp(seed=11)
    (got,) = torch.autograd.grad(adaptive_kl(q, p).sum(), q)
    probs_p, probs_q = p.exp(), q.detach().exp()  # the weights, as constants
    sorted_p, idx = probs_p.sort(-1, descending=True)
    errors = (sorted_p - probs_q.gather(-1, idx)).abs()
    tail = sorted_p.cumsum(-1) > 0.5
    tail[:, 0] = False
    w_head = errors.masked_fill(tail, 0).sum(-1) / errors.sum(-1)
    q2 = q.detach().clone().requires_grad_()
    weighted = w_head * forward_kl(q2, p) + (1 - w_head) * reverse_kl(q2, p)
    (want,) = torch.autograd.grad(weighted.sum(), q2)
    torch.testing.assert_close(got, want)


def test_akl_is_zero_for_identical_inputs_non_negative_and_between_its_kls():
    q = _logp(seed=12)
    assert torch.equal(adaptive_kl(q, q), torch.zeros(q.shape[0], dtype=q.dtype))  # g = 0: no 0/0
    for seed in range(5):
        p = _logp(seed=20 + seed)
        value, fkl, rkl = adaptive_kl(q, p), forward_kl(q, p), reverse_kl(q, p)
        assert (value >= 0).all()
        assert (value <= torch.maximum(fkl, rkl) + 1e-12).all() and (value >= torch.minimum(fkl, rkl) - 1e-12).all()


def test_akl_with_a_peaked_teacher_is_mostly_forward_kl_and_a_column_minus_inf_on_both_sides_is_absent():
    q = _logp(vocab=8, seed=13).float()
    p = torch.log_softmax(torch.tensor([[9.0] + [0.0] * 7] * q.shape[0]), -1)  # head = the top token only
    padded_q = torch.cat([q, torch.full((q.shape[0], 2), -math.inf)], -1).requires_grad_()
    padded_p = torch.cat([p, torch.full((p.shape[0], 2), -math.inf)], -1)
    value = adaptive_kl(padded_q, padded_p)
    torch.testing.assert_close(value, adaptive_kl(q, p))
    (grad,) = torch.autograd.grad(value.sum(), padded_q)
    assert torch.isfinite(grad).all() and (grad[:, 8:] == 0).all()


# --- the per-token API -------------------------------------------------------------


@pytest.mark.parametrize(("name", "params"), [("ab", {}), ("ab", {"alpha": 0.0, "beta": 0.0}), ("akl", {}),
                                              ("akl", {"mu": 0.2})])
def test_token_divergences_average_to_the_divergence(recipe_file, tokenizer, name, params):
    run, batch = _run(recipe_file, tokenizer, "abkd", dropout=0.0), _batch(tokenizer)
    student, teacher = run.student_logits(batch), run.teacher_logits(batch)
    tokens = run.token_divergences(name, student, teacher, batch, temperature=2.0, **params)
    assert tokens.shape == (int(batch.label_mask.sum()),)
    mean = run.divergence(name, student, teacher, batch, temperature=2.0, **params)
    torch.testing.assert_close(tokens.sum() / batch.label_mask.sum(), mean)
    rows = student[batch.label_mask]  # row-major mask order: the first token's value
    first = registry().divergences[name].per_token(torch.log_softmax(rows[:1].float() / 2, -1),
                                                    torch.log_softmax(teacher[batch.label_mask][:1].float() / 2, -1),
                                                    **{**registry().divergences[name].params, **params})
    torch.testing.assert_close(tokens[:1], first)


# --- the methods' losses against the references ------------------------------------


def test_abkd_loss_matches_ab_div(recipe_file, tokenizer):
    """finetune.py: (1 - kd_ratio) * lm_loss + kd_ratio * ab_div(logits, teacher_logits, ...), kd_ratio 1."""
    run, batch = _run(recipe_file, tokenizer, "abkd", overrides=["methods.abkd.kd_ratio=0.75"]), _batch(tokenizer)
    params = [p for p in run.student.parameters() if p.requires_grad]
    torch.manual_seed(0)
    got = _stage_terms(run, 0, batch)["loss"]
    torch.manual_seed(0)  # the same dropout masks: the student trains in train mode
    logits, teacher_logits = run.student_logits(batch), run.teacher_logits(batch)
    mask = batch.label_mask
    p, q = F.softmax(teacher_logits.double(), -1), F.softmax(logits.double(), -1)
    want = 0.25 * ref_lm_loss(logits, batch) + 0.75 * ref_ab(p[mask], q[mask], 0.2, 0.7).mean()
    assert got.item() == pytest.approx(want.item(), **TOL)
    _assert_same_grads(_grads(got, params), _grads(want, params))


def test_akl_loss_matches_the_reference(recipe_file, tokenizer):
    """LMOps finetune.py with AKL.py's distil loss: 0.5 * lm_loss + 0.5 * AKL."""
    run, batch = _run(recipe_file, tokenizer, "akl"), _batch(tokenizer)
    params = [p for p in run.student.parameters() if p.requires_grad]
    torch.manual_seed(0)
    got = _stage_terms(run, 0, batch)["loss"]
    torch.manual_seed(0)
    logits, teacher_logits = run.student_logits(batch), run.teacher_logits(batch)
    mask = batch.label_mask
    p = F.softmax(teacher_logits.double(), -1)[mask]
    q_rows = logits.double()[mask]
    q = F.softmax(q_rows, -1)
    sorted_p, idx = p.sort(-1, descending=True)
    errors = (sorted_p - q.detach().gather(-1, idx)).abs()
    tail = sorted_p.cumsum(-1) > 0.5
    tail[:, 0] = False
    s1, s2 = errors.masked_fill(tail, 0).sum(-1), errors.masked_fill(~tail, 0).sum(-1)
    fkl, rkl = (p * (p.log() - q.log())).sum(-1), (q * (q.log() - p.log())).sum(-1)
    want = 0.5 * ref_lm_loss(logits, batch) + 0.5 * (s1 / (s1 + s2) * fkl + s2 / (s1 + s2) * rkl).mean()
    assert got.item() == pytest.approx(want.item(), **TOL)
    _assert_same_grads(_grads(got, params), _grads(want, params))


def test_the_methods_follow_the_papers_setting():
    abkd, akl = registry().methods["abkd"], registry().methods["akl"]
    assert (abkd.source, abkd.student_init, akl.source, akl.student_init) == ("dataset", "sft", "dataset", "pretrained")
    assert (abkd.options().alpha, abkd.options().beta, abkd.options().kd_ratio) == (0.2, 0.7, 1.0)
    assert (akl.options().mu, akl.options().kd_ratio) == (0.5, 0.5)


# --- option errors at assembly -----------------------------------------------------


@pytest.mark.parametrize(("method", "setting", "message"), [
    ("abkd", "methods.abkd.alpha=-0.5", "'methods.abkd.alpha' must be >= 0, got -0.5"),
    ("abkd", "methods.abkd.beta=-1", "'methods.abkd.beta' must be >= 0, got -1.0"),
    ("abkd", "methods.abkd.kd_ratio=1.5", "'methods.abkd.kd_ratio' must be in [0, 1], got 1.5"),
    ("akl", "methods.akl.mu=1.5", "'methods.akl.mu' must be in [0, 1], got 1.5"),
    ("akl", "methods.akl.loss_temperature=0", "'methods.akl.loss_temperature' must be > 0, got 0"),
])
def test_option_errors_are_raised_at_assembly(recipe_file, monkeypatch, method, setting, message):
    assert message in _error(recipe_file, monkeypatch, method, setting)


# --- end to end ----------------------------------------------------------------------


def _losses(run_dir) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "val/rougeL" not in r]


@pytest.mark.parametrize("method", ["abkd", "akl"])
def test_method_trains_with_falling_loss_and_resumes_exactly(method, recipe_file, tmp_path, monkeypatch):
    recipe = str(recipe_file(steps=6, eval_every=2))
    overrides = ["student.config.resid_pdrop=0.1"]  # dropout: the RNG state must be restored too
    train(method, recipe, output=tmp_path / "straight", overrides=overrides)
    losses = _losses(tmp_path / "straight")
    assert len(losses) == 6 and sum(losses[-2:]) / 2 < 0.9 * sum(losses[:2]) / 2, losses
    train_killed_during_step(monkeypatch, 4, lambda: train(method, recipe, output=tmp_path / "killed",
                                                           overrides=overrides))
    train(method, recipe, output=tmp_path / "killed", overrides=overrides, resume=True)
    final = "checkpoints/step-0000006/model.safetensors"
    assert_same_tensors(tmp_path / "straight" / final, tmp_path / "killed" / final)
    assert _losses(tmp_path / "killed")[-1] == losses[-1]
