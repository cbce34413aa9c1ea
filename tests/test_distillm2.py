"""Paired sources and DistiLLM-2: the ``teacher_student`` source's two views are aligned and its teacher
view is cached across runs; the loss and gradients against a transcription of jongwooko/distillm-2
``src/distillm_trainer.py`` (``get_batch_logps``, ``kd_loss``); the detached skew reverse KL's properties;
DistiLLM-2 trains end to end with a falling loss and resumes exactly; its options are checked at assembly;
a third-party source returning two views trains it."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

import distillkit.builtins.sources as sources_module
from distillkit import hookimpl
from distillkit.api import Method, PairedBatch, SourceFactory, Stage, collate
from distillkit.builtins.divergences import reverse_kl, skew_reverse_kl
from distillkit.engine.losses import masked_divergence
from distillkit.training.pipeline import train
from distillkit.training.trainer import Trainer
from plugins.distillm2 import DistiLLM2Options, beta, distillm2_loss, skew_reverse_kl_detached

from .conftest import assert_same_tensors, plugins_installed, train_killed_during_step
from .test_faults import _one_line_error
from .test_taid import _records

# --- a transcription of the reference (jongwooko/distillm-2 src/distillm_trainer.py) -------------------------------


def reference_position_kls(logits, tea_logits, mask, alpha_1=0.1, alpha_2=0.1):
    """``get_batch_logps`` (distillm_v2, fixed alpha, average_log_prob=True): per-sequence SKL and SRKL, (B,)."""
    vocab_logps, tea_vocab_logps = logits.log_softmax(-1), tea_logits.log_softmax(-1)
    mix = torch.logsumexp(torch.stack([math.log(alpha_1) + tea_vocab_logps,
                                       math.log(1 - alpha_1) + vocab_logps]), dim=0)
    tea_pos_kl = (tea_vocab_logps.exp() * (tea_vocab_logps - mix)).sum(-1)
    mix = torch.logsumexp(torch.stack([math.log(1 - alpha_2) + tea_vocab_logps,
                                       math.log(alpha_2) + vocab_logps.detach()]), dim=0)
    ref_pos_kl = (vocab_logps.exp() * (vocab_logps - mix)).sum(-1)
    return (tea_pos_kl * mask).sum(-1) / mask.sum(-1), (ref_pos_kl * mask).sum(-1) / mask.sum(-1)


def reference_loss(chosen, rejected, global_step, max_steps):
    """``kd_loss`` with ``gradual_beta``."""
    b = 1.0 + 0.5 * min(1., 2 * global_step / max_steps)
    return ((2 - b) * chosen + b * rejected).mean()


def _views(generator, rows=3, width=6, vocab=11):
    """Two views with the same number of response tokens in every row (so that the reference's
    mean of sequence means equals distillkit's token mean), and their logits."""
    batches, logits = [], []
    for offset in (0, 1):
        prompts = [[1] * (2 + offset)] * rows
        responses = [torch.randint(0, vocab, (width,), generator=generator).tolist() for _ in range(rows)]
        batch = collate(prompts, responses, 0)
        batches.append(batch)
        shape = (*batch.labels.shape, vocab)
        logits.append((3 * torch.randn(shape, generator=generator, dtype=torch.float64),
                       3 * torch.randn(shape, generator=generator, dtype=torch.float64)))
    return PairedBatch(*(getattr(batches[0], f) for f in ("input_ids", "attention_mask", "response_mask")),
                       batches[1]), logits


@pytest.mark.parametrize("step", [0, 3, 9])
def test_loss_and_gradients_match_the_reference(step):
    from distillkit.registry import registry

    batch, ((s_t, p_t), (s_s, p_s)) = _views(torch.Generator().manual_seed(step))
    ours = [s.clone().requires_grad_() for s in (s_t, s_s)]
    by_view = {id(batch): (ours[0], p_t), id(batch.paired): (ours[1], p_s)}
    run = SimpleNamespace(
        options=DistiLLM2Options(), student_response_logits=lambda b: by_view[id(b)][0],
        teacher_response_logits=lambda b: by_view[id(b)][1],  # dense logits stand in: the loss helpers take both
        teacher_signal=lambda b: by_view[id(b)][1],
        schedule=lambda name, **params: registry().schedules[name].value(step + 1, 10, **params),
        divergence=lambda name, s, t, b, **params: masked_divergence(registry().divergences[name], s, t, b.label_mask,
                                                                     **params))
    terms = distillm2_loss(run, batch)
    terms["loss"].backward()

    theirs = [s.clone().requires_grad_() for s in (s_t, s_s)]
    chosen, _ = reference_position_kls(theirs[0], p_t, batch.label_mask)
    _, rejected = reference_position_kls(theirs[1], p_s, batch.paired.label_mask)
    expected = reference_loss(chosen, rejected, step, 10)
    expected.backward()
    assert float(terms["loss"].detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    for mine, reference in zip(ours, theirs):
        torch.testing.assert_close(mine.grad, reference.grad.to(mine.grad.dtype), rtol=1e-4, atol=1e-7)


def test_beta_follows_the_reference_curriculum():
    assert [beta(k, 10) for k in (1, 3, 6, 7, 10)] == [1.0 + 0.5 * min(1.0, 2 * (k - 1) / 10) for k in (1, 3, 6, 7, 10)]
    assert beta(1, 10) == 1.0 and beta(6, 10) == 1.5 and beta(10, 10, end=1.0) == 1.0


def test_detached_skew_reverse_kl_properties():
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(7, 13, generator=generator, dtype=torch.float64).log_softmax(-1)
    p = torch.randn(7, 13, generator=generator, dtype=torch.float64).log_softmax(-1)
    for alpha in (0.1, 0.5, 0.9):
        value = skew_reverse_kl_detached(q, p, alpha)
        torch.testing.assert_close(value, skew_reverse_kl(q, p, alpha))  # the same value as the built-in
        assert bool((value >= 0).all())
        torch.testing.assert_close(skew_reverse_kl_detached(q, q, alpha), torch.zeros(7, dtype=torch.float64))
    torch.testing.assert_close(skew_reverse_kl_detached(q, p, 0.0), reverse_kl(q, p))  # alpha = 0: reverse KL

    # the gradient: no path through the mixture's q (the reference's vocab_logps.detach()), unlike the built-in
    logits = torch.randn(7, 13, generator=generator, dtype=torch.float64, requires_grad=True)
    mix = torch.logaddexp(math.log(0.9) + p, math.log(0.1) + logits.log_softmax(-1).detach())
    naive = (logits.log_softmax(-1).exp() * (logits.log_softmax(-1) - mix)).sum()
    (expected,) = torch.autograd.grad(naive, logits)
    (ours,) = torch.autograd.grad(skew_reverse_kl_detached(logits.log_softmax(-1), p, 0.1).sum(), logits)
    (builtin,) = torch.autograd.grad(skew_reverse_kl(logits.log_softmax(-1), p, 0.1).sum(), logits)
    torch.testing.assert_close(ours, expected)
    assert not torch.allclose(builtin, expected)


# --- the paired source and training end to end -------------------------------------------------------------------


def _prompt_rows(batch):
    return [row[mask.bool() & ~response].tolist()
            for row, mask, response in zip(batch.input_ids, batch.attention_mask, batch.response_mask)]


def test_distillm2_trains_with_aligned_views_falling_loss_and_resumes_exactly(recipe_file, tmp_path, monkeypatch):
    seen = []
    original = Trainer.micro_batches

    def spy(self, examples):
        batches = original(self, examples)
        seen.extend(batches)
        return batches

    recipe = str(recipe_file(steps=10, eval_every=5))
    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "micro_batches", spy)
        train("distillm2", recipe, output=tmp_path / "straight")
    paired = [b for b in seen if isinstance(b, PairedBatch)]  # (the SFT start's batches are plain)
    assert len(paired) == 10 * 2  # every micro-batch of the 10 steps
    for batch in paired:  # the same prompts, row by row, with different responses
        assert _prompt_rows(batch) == _prompt_rows(batch.paired)
    assert any(not torch.equal(b.input_ids, b.paired.input_ids) for b in paired)
    records = _records(tmp_path / "straight")
    losses = [r["loss"] for r in records]
    assert len(losses) == 10 and sum(losses[-3:]) / 3 < 0.9 * sum(losses[:3]) / 3, losses
    assert [r["beta"] for r in records] == pytest.approx([beta(k, 10) for k in range(1, 11)])

    def no_generation(*args, **kwargs):
        raise AssertionError("the teacher view was generated again instead of read from the cache")

    monkeypatch.setattr(sources_module, "_generate_shared", no_generation)  # the teacher view is cached
    train_killed_during_step(monkeypatch, 7, lambda: train("distillm2", recipe, output=tmp_path / "killed"))
    train("distillm2", recipe, output=tmp_path / "killed", resume=True)  # from the step-5 checkpoint
    final = "checkpoints/step-0000010/model.safetensors"
    assert_same_tensors(tmp_path / "straight" / final, tmp_path / "killed" / final)
    assert _records(tmp_path / "straight") == _records(tmp_path / "killed")  # the same losses, step by step


@pytest.mark.parametrize(("setting", "message"), [
    ("methods.distillm2.alpha=0.0", "'methods.distillm2.alpha' must be in (0, 1), got 0.0"),
    ("methods.distillm2.beta_end=2.5", "'methods.distillm2.beta_end' must be in [0, 2] (both weights >= 0), got 2.5"),
    ("methods.distillm2.ramp=0", "'methods.distillm2.ramp' must be in (0, 1], got 0"),
])
def test_distillm2_options_are_checked_at_assembly(recipe_file, monkeypatch, setting, message):
    error = _one_line_error(["train", "--method", "distillm2", "--recipe", str(recipe_file()), "--set", setting],
                            monkeypatch)
    assert message in error, error


class PairsPlugin:
    """A third-party source of two views: the dataset response, and the same prompt's response cut in half."""

    @hookimpl
    def distillkit_register_sources(self):
        def build(run):
            def make_batch(examples):
                prompts = [e.prompt_ids for e in examples]
                first = collate(prompts, [e.response_ids for e in examples], run.tokenizer.pad_token_id)
                halves = [e.response_ids[: max(1, len(e.response_ids) // 2)] for e in examples]
                return PairedBatch(first.input_ids, first.attention_mask, first.response_mask,
                                   collate(prompts, halves, run.tokenizer.pad_token_id))
            return make_batch

        return [SourceFactory("x-pairs", "dataset responses and their first halves", build)]

    @hookimpl
    def distillkit_register_methods(self):
        return [Method("x-contrast", "DistiLLM-2's loss on a third-party pair source",
                       stages=(Stage("student", distillm2_loss),), source="x-pairs", teacher_adapter="frozen",
                       options=DistiLLM2Options)]


@pytest.fixture
def pairs_plugin(monkeypatch):
    with plugins_installed(monkeypatch, {"pairs": PairsPlugin()}):
        yield


def test_a_third_party_source_returning_two_views_trains(pairs_plugin, recipe_file, tmp_path):
    train("x-contrast", str(recipe_file(steps=2, eval_every=2)), output=tmp_path / "run")
    records = _records(tmp_path / "run")
    assert len(records) == 2 and all(math.isfinite(r["loss"]) and r["srkl"] > 0 for r in records), records
