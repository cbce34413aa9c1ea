"""ABKD's alpha-beta divergence against a naive float64 transcription of the
reference (ghwang-s/abkd ``distillm/losses.py`` ``ab_div``), its special cases
and -inf conventions, the method's loss and gradients, per-token values,
option errors at assembly, and end-to-end training with an exact resume.
(AKL is the example plugin package examples/distillkit-akl, with its own tests.)"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings

from distillkit.builtins.divergences import alpha_beta, forward_kl, reverse_kl
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
    """Zero for identical inputs, non-negative, the reference's value."""
    q, p = pair
    for alpha, beta in [(0.2, 0.7), (0.1, 0.8), (1.0, 0.0), (0.0, 1.0), (0.3, 0.0), (0.0, 0.0), (2.0, 0.5)]:
        assert alpha_beta(q, q, alpha, beta).abs().max() < 1e-12
        assert (alpha_beta(q, p, alpha, beta) >= -1e-12).all()
    torch.testing.assert_close(alpha_beta(q, p, 0.2, 0.7), ref_ab(p.exp(), q.exp(), 0.2, 0.7), rtol=1e-7, atol=1e-9)


def test_ab_refuses_negative_parameters():
    q = _logp()
    with pytest.raises(ValueError, match="alpha, beta >= 0"):
        alpha_beta(q, q, -0.1, 0.5)


# --- the per-token API -------------------------------------------------------------


@pytest.mark.parametrize("params", [{}, {"alpha": 0.0, "beta": 0.0}, {"alpha": 1.0, "beta": 0.0}])
def test_token_divergences_average_to_the_divergence(recipe_file, tokenizer, params):
    name = "ab"
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


def test_the_method_follows_the_papers_setting():
    abkd = registry().methods["abkd"]
    assert (abkd.source, abkd.student_init) == ("dataset", "sft")
    assert (abkd.options().alpha, abkd.options().beta, abkd.options().kd_ratio) == (0.2, 0.7, 1.0)


# --- option errors at assembly -----------------------------------------------------


@pytest.mark.parametrize(("method", "setting", "message"), [
    ("abkd", "methods.abkd.alpha=-0.5", "'methods.abkd.alpha' must be >= 0, got -0.5"),
    ("abkd", "methods.abkd.beta=-1", "'methods.abkd.beta' must be >= 0, got -1.0"),
    ("abkd", "methods.abkd.kd_ratio=1.5", "'methods.abkd.kd_ratio' must be in [0, 1], got 1.5"),
])
def test_option_errors_are_raised_at_assembly(recipe_file, monkeypatch, method, setting, message):
    assert message in _error(recipe_file, monkeypatch, method, setting)


# --- end to end ----------------------------------------------------------------------


def _losses(run_dir) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "val/rougeL" not in r]


def test_method_trains_with_falling_loss_and_resumes_exactly(recipe_file, tmp_path, monkeypatch):
    method = "abkd"
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
