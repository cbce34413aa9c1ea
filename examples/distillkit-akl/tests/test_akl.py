"""distillkit-akl: the divergence against a naive float64 transcription of wutaiqiang/LLM_KD_AKL ``AKL.py``
(``get_ratio`` + ``get_kl``), its properties and special cases, the method's loss and gradients, its
registration, an option error at assembly, and end-to-end training with an exact resume after a kill.

Imports only ``distillkit.api`` and this package (plus the helpers in ``conftest.py``): everything else is
driven through the ``distillkit`` command line, as a user would."""

from __future__ import annotations

import json
import math
import signal
import subprocess
from pathlib import Path

import distillkit_akl
import pytest
import torch
import torch.nn.functional as F
from conftest import distillkit, distillkit_command, environment, losses
from distillkit_akl import AKLOptions, adaptive_kl, akl_loss
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from distillkit.api import TrainBatch


def _logp(rows: int = 6, vocab: int = 11, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.log_softmax(scale * torch.randn(rows, vocab, generator=gen, dtype=torch.float64), -1)


def _kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return (p * (p.log() - q.log())).sum(-1)


def ref_akl(p: torch.Tensor, q: torch.Tensor, mu: float = 0.5) -> torch.Tensor:
    """AKL.py get_ratio + get_kl per row, in probabilities (teacher p, student q)."""
    sorted_p, idx = p.sort(dim=-1, descending=True)
    errors = (sorted_p - q.detach().gather(-1, idx)).abs()
    tail = sorted_p.cumsum(-1) > mu
    tail[:, 0] = False
    s1, s2 = errors.masked_fill(tail, 0).sum(-1), errors.masked_fill(~tail, 0).sum(-1)
    return s1 / (s1 + s2) * _kl(p, q) + s2 / (s1 + s2) * _kl(q, p)


@st.composite
def logp_pairs(draw) -> tuple[torch.Tensor, torch.Tensor]:
    """(trainable, target) float64 log-probabilities (N, V), logits of any scale."""
    rows, vocab = draw(st.integers(1, 4)), draw(st.integers(2, 12))
    seed, scale = draw(st.integers(0, 2**31 - 1)), draw(st.sampled_from([0.1, 1.0, 5.0, 20.0]))
    gen = torch.Generator().manual_seed(seed)
    logits = scale * torch.randn(2, rows, vocab, generator=gen, dtype=torch.float64)
    return torch.log_softmax(logits[0], -1), torch.log_softmax(logits[1], -1)


# --- the divergence ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mu", [0.5, 0.0, 0.9])
def test_akl_matches_the_reference(mu):
    q, p = _logp(seed=8), _logp(seed=9)
    torch.testing.assert_close(adaptive_kl(q, p, mu), ref_akl(p.exp(), q.exp(), mu))


def test_the_weights_carry_no_gradient():
    """AKL.py detaches the student in get_ratio: the gradient is w_head dFKL + w_tail dRKL at fixed weights."""
    q, p = _logp(seed=10).requires_grad_(), _logp(seed=11)
    (got,) = torch.autograd.grad(adaptive_kl(q, p).sum(), q)
    q2 = q.detach().clone().requires_grad_()
    (want,) = torch.autograd.grad(ref_akl(p.exp(), q2.exp()).sum(), q2)  # ref_akl detaches q in its weights
    torch.testing.assert_close(got, want)


@settings(max_examples=40, deadline=None)
@given(logp_pairs())
def test_properties_against_the_naive_reference(pair):
    """Zero for identical inputs, non-negative, between its two KLs, the reference's value."""
    q, p = pair
    assert adaptive_kl(q, q).abs().max() < 1e-12
    value, fkl, rkl = adaptive_kl(q, p), _kl(p.exp(), q.exp()), _kl(q.exp(), p.exp())
    assert (value >= -1e-12).all()
    assert ((value >= torch.minimum(fkl, rkl) - 1e-9) & (value <= torch.maximum(fkl, rkl) + 1e-9)).all()
    differ = (p.exp() != q.exp()).any(-1)  # where P = Q the reference's weights are 0/0
    if bool((p.exp() > 0).all() and (q.exp() > 0).all()):  # the reference's logs need no zero probabilities
        torch.testing.assert_close(value[differ], ref_akl(p.exp(), q.exp())[differ], rtol=1e-7, atol=1e-9)


def test_identical_inputs_give_exactly_zero_not_nan():
    q = _logp(seed=12)
    assert torch.equal(adaptive_kl(q, q), torch.zeros(q.shape[0], dtype=q.dtype))  # g = 0: no 0/0


def test_reduces_to_reverse_kl_without_a_head_gap_and_to_forward_kl_without_a_tail_gap():
    p = torch.tensor([[0.6, 0.2, 0.1, 0.06, 0.04]], dtype=torch.float64)  # head at mu = 0.5: the top token
    tail_moved = torch.tensor([[0.6, 0.1, 0.2, 0.04, 0.06]], dtype=torch.float64)  # g_head = 0
    assert torch.equal(adaptive_kl(tail_moved.log(), p.log()), _kl(tail_moved, p))
    head_moved = torch.tensor([[0.5, 0.3, 0.1, 0.06, 0.04]], dtype=torch.float64)  # mu = 0.8: head = top 2
    torch.testing.assert_close(adaptive_kl(head_moved.log(), p.log(), mu=0.8), _kl(p, head_moved))  # g_tail = 0


def test_a_column_minus_inf_on_both_sides_is_absent():
    q = _logp(vocab=8, seed=13).float()
    p = torch.log_softmax(torch.tensor([[9.0] + [0.0] * 7] * q.shape[0]), -1)
    padded_q = torch.cat([q, torch.full((q.shape[0], 2), -math.inf)], -1).requires_grad_()
    padded_p = torch.cat([p, torch.full((p.shape[0], 2), -math.inf)], -1)
    value = adaptive_kl(padded_q, padded_p)
    torch.testing.assert_close(value, adaptive_kl(q, p))
    (grad,) = torch.autograd.grad(value.sum(), padded_q)
    assert torch.isfinite(grad).all() and (grad[:, 8:] == 0).all()


def test_mu_outside_zero_one_is_refused():
    with pytest.raises(ValueError, match="0 <= mu <= 1"):
        adaptive_kl(_logp(), _logp(seed=1), mu=1.5)


# --- the method's loss, with a minimal step context ------------------------------------------------------


class StepContextStub:
    """The members of ``distillkit.api.StepContext`` that ``akl_loss`` calls, written out naively:
    fixed logits, the mean NLL and the mean registered divergence over response tokens, and their weighted sum."""

    def __init__(self, options: AKLOptions, student: torch.Tensor, teacher: torch.Tensor) -> None:
        self.options, self._student, self._teacher = options, student, teacher
        self._divergences = {d.name: d for d in distillkit_akl.distillkit_register_divergences()}

    def student_response_logits(self, batch: TrainBatch) -> torch.Tensor:
        return self._student  # dense logits stand in: the loss helpers take both

    def teacher_signal(self, batch: TrainBatch) -> torch.Tensor:
        return self._teacher

    def cross_entropy(self, logits: torch.Tensor, batch: TrainBatch) -> torch.Tensor:
        return F.cross_entropy(logits[batch.label_mask].float(), batch.labels[batch.label_mask])

    def divergence(self, name, trainable, target, batch, *, temperature=1.0, **params) -> torch.Tensor:
        divergence = self._divergences[name]
        rows = [torch.log_softmax(x[batch.label_mask].float() / temperature, -1) for x in (trainable, target)]
        return divergence.per_token(*rows, **{**divergence.params, **params}).mean()

    def loss(self, trainable, batch, terms) -> dict[str, torch.Tensor]:
        means = {name: self.cross_entropy(trainable, batch) if term.divergence is None else self.divergence(
            term.divergence, trainable, term.target, batch, temperature=term.temperature, **term.params)
            for name, term in terms.items()}
        return {"loss": sum(terms[name].weight * mean for name, mean in means.items()), **means}


def test_the_loss_and_its_gradients_follow_lmops_kd_with_akl():
    """LMOps finetune.py with AKL.py's distil loss: (1 - kd_ratio) * lm_loss + kd_ratio * AKL."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 13, (2, 7), generator=gen)
    response = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 1, 0, 0]], dtype=torch.bool)
    batch = TrainBatch(ids, torch.ones_like(ids), response)
    student = (2 * torch.randn(2, 6, 13, generator=gen)).requires_grad_()
    teacher = 2 * torch.randn(2, 6, 13, generator=gen)
    options = AKLOptions(mu=0.4, kd_ratio=0.3)
    got = akl_loss(StepContextStub(options, student, teacher), batch)["loss"]
    (got_grad,) = torch.autograd.grad(got, student)

    s64 = student.detach().double().requires_grad_()
    mask = batch.label_mask
    p, q = F.softmax(teacher.double(), -1)[mask], F.softmax(s64, -1)[mask]
    lm_loss = F.cross_entropy(s64[mask], batch.labels[mask])
    want = 0.7 * lm_loss + 0.3 * ref_akl(p, q, mu=0.4).mean()
    (want_grad,) = torch.autograd.grad(want, s64)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    torch.testing.assert_close(got_grad, want_grad.float(), rtol=1e-4, atol=1e-6)


def test_the_registrations_follow_the_papers_setting():
    (method,) = distillkit_akl.distillkit_register_methods()
    assert (method.name, method.source, method.teacher_adapter, method.student_init) == \
        ("akl", "dataset", "frozen", "pretrained")
    assert (method.options().mu, method.options().kd_ratio, method.options().loss_temperature) == (0.5, 0.5, 1.0)
    (divergence,) = distillkit_akl.distillkit_register_divergences()
    assert (divergence.name, divergence.params) == ("akl", {"mu": 0.5})


# --- through the command line: registration, an option error, training and resuming -------------------------


def test_distillkit_lists_the_method_from_this_package(cache_dir):
    result = distillkit(cache_dir, "methods", "--json")
    assert result.returncode == 0, result.stderr
    assert {"name": "akl", "plugin": "distillkit-akl:akl"}.items() <= \
        {r["name"]: r for r in json.loads(result.stdout)}["akl"].items()


@pytest.mark.parametrize(("setting", "message"), [
    ("methods.akl.mu=1.5", "error: 'methods.akl.mu' must be in [0, 1], got 1.5"),
    ("methods.akl.loss_temperature=0", "error: 'methods.akl.loss_temperature' must be > 0, got 0"),
])
def test_a_bad_option_stops_at_assembly_with_one_line(cache_dir, recipe, setting, message):
    result = distillkit(cache_dir, "train", "--method", "akl", "--recipe", str(recipe()), "--set", setting)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), result.stderr


def _train_killed_after_checkpoint(cache_dir: Path, args: list[str], checkpoint: Path) -> None:
    """Start ``distillkit train ARGS``; SIGKILL it as soon as ``checkpoint`` is published (checkpoints
    appear atomically).  Fails unless it died before finishing."""
    process = subprocess.Popen(distillkit_command("train", *args), env=environment(cache_dir),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while not checkpoint.is_dir():
            if process.poll() is not None:
                pytest.fail(f"the run ended before {checkpoint.name}: {process.stderr.read()}")
            try:
                process.wait(timeout=0.005)
            except subprocess.TimeoutExpired:
                pass
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
        process.stderr.close()


def test_trains_with_falling_loss_and_resumes_exactly_after_a_kill(cache_dir, recipe, tmp_path):
    args = ["--method", "akl", "--recipe", str(recipe(steps=6, eval_every=2))]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    result = distillkit(cache_dir, "train", *args, "--output", str(straight))
    assert result.returncode == 0, result.stderr
    run_losses = losses(straight)
    assert len(run_losses) == 6 and sum(run_losses[-2:]) / 2 < 0.9 * sum(run_losses[:2]) / 2, run_losses

    _train_killed_after_checkpoint(cache_dir, [*args, "--output", str(killed)],
                                   killed / "checkpoints" / "step-0000002")
    assert not (killed / "checkpoints" / "step-0000006").exists()
    result = distillkit(cache_dir, "train", *args, "--output", str(killed), "--resume")
    assert result.returncode == 0, result.stderr
    final = Path("checkpoints/step-0000006/model.safetensors")
    a, b = load_file(straight / final), load_file(killed / final)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert losses(killed)[-1] == run_losses[-1]
