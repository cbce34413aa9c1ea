"""MiniLLM: teacher-mixed sampling, the rollout buffer, and each loss term
against a naive float64 reference written from the reference code's formulas."""

from __future__ import annotations

import math
import threading

import pytest
import torch

from distillkit.api import collate
from distillkit.builtins.teacher_adapters import FrozenTeacher
from distillkit.config import GenerationConfig
from distillkit.engine.sampling import sample
from distillkit.errors import DistillkitError
from distillkit.plugins.minillm import MiniLLMOptions, advantages, minillm_loss, rewards
from distillkit.plugins.minillm.rollouts import RolloutBatch, teacher_mix
from distillkit.registry import registry

from .conftest import instruction_examples, make_run, tiny_model


def _sample(tokenizer, model, prompts, seed, **kwargs):
    generator = torch.Generator().manual_seed(seed)
    return sample(model, prompts, GenerationConfig(max_new_tokens=12), eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id, vocab_size=len(tokenizer), generator=generator, **kwargs)


def test_mixed_sampling_endpoints_are_the_single_models(tokenizer):
    student, teacher = tiny_model(tokenizer, seed=1), tiny_model(tokenizer, seed=2, n_embd=48)
    prompts = [e.prompt_ids for e in instruction_examples(tokenizer)]
    plain_student = _sample(tokenizer, student, prompts, 5)
    assert _sample(tokenizer, student, prompts, 5, guide_model=teacher, rule=teacher_mix(0.0)) == plain_student
    assert _sample(tokenizer, student, prompts, 5, guide_model=teacher, rule=teacher_mix(1.0)) == _sample(
        tokenizer, teacher, prompts, 5)
    assert plain_student != _sample(tokenizer, teacher, prompts, 5)  # so the endpoints test something


def test_mixed_sampling_draws_from_the_probability_mixture(tokenizer):
    student, teacher = tiny_model(tokenizer, seed=1), tiny_model(tokenizer, seed=2, n_embd=48)
    prompt = instruction_examples(tokenizer)[0].prompt_ids
    prompts = [prompt] * 64
    settings = GenerationConfig(max_new_tokens=1)
    generator = torch.Generator().manual_seed(3)
    drawn = sample(student, prompts, settings, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                   vocab_size=len(tokenizer), generator=generator, guide_model=teacher,
                   rule=teacher_mix(0.3))
    with torch.no_grad():
        ids = torch.tensor([prompt])
        student.eval(), teacher.eval()
        p_student = student(ids).logits[0, -1, : len(tokenizer)].double().softmax(-1)
        p_teacher = teacher(ids).logits[0, -1, : len(tokenizer)].double().softmax(-1)
    mixture = (0.7 * p_student + 0.3 * p_teacher).float().expand(64, -1)
    expected = torch.multinomial(mixture, 1, generator=torch.Generator().manual_seed(3)).squeeze(-1)
    assert [row[0] for row in drawn] == expected.tolist()


def _rollout_batch(tokenizer, teacher_lp, old_lp, prompt_lengths=(3, 5), response_lengths=(4, 2)):
    """A RolloutBatch with given per-token log-probs (lists per response)."""
    prompts = [[5] * n for n in prompt_lengths]
    responses = [[7] * n for n in response_lengths]
    batch = collate(prompts, responses, tokenizer.pad_token_id)
    mask = batch.label_mask

    def place(values):
        full = torch.zeros(mask.shape)
        full[mask] = torch.tensor([v for row in values for v in row])
        return full

    return RolloutBatch(batch.input_ids, batch.attention_mask, batch.response_mask, place(old_lp), place(teacher_lp),
                        None, batch)


def _naive_advantages(per_response_rewards, gamma, block_width):
    """A transcription of the reference (microsoft/LMOps minillm/minillm/losses.py
    _get_advantages_and_returns, utils.py whiten with get_global_statistics): the
    discounted return from t (r_t included) over the tokens left, then whitening
    over a (B, block_width) block whose padding holds zeros (0: over the tokens
    only), with the population variance (sum_var / count)."""
    block, values = [], []
    for row in per_response_rewards:
        normalised = []
        for t in range(len(row)):
            ret = sum(gamma ** (k - t) * row[k] for k in range(t, len(row)))
            normalised.append(ret / (len(row) - t))
        values.extend(normalised)
        block.extend(normalised + [0.0] * (max(block_width - len(row), 0)))
    stats = torch.tensor(block if block_width else values, dtype=torch.float64)
    mean = stats.mean().item()
    var = ((stats - mean) ** 2).sum().item() / stats.numel()
    return [(v - mean) / math.sqrt(var + 1e-8) for v in values]


@pytest.mark.parametrize("block_width", [0, 4, 9])
def test_rewards_and_advantages_match_the_reference(tokenizer, block_width):
    teacher_lp = [[-1.0, -2.0, -0.5, -3.0], [-0.2, -400.0]]
    old_lp = [[-1.5, -1.0, -0.5, -2.0], [-0.4, -1.0]]
    batch = _rollout_batch(tokenizer, teacher_lp, old_lp)
    opts = MiniLLMOptions(reward_scaling=0.5, reward_clip=100.0)
    r = rewards(batch, opts)
    expected = [[max(-100.0, min(100.0, (t - o) / 0.5)) for t, o in zip(tr, orow)] for tr, orow in zip(teacher_lp, old_lp)]
    assert r[batch.label_mask].tolist() == pytest.approx([v for row in expected for v in row])
    assert r[~batch.label_mask].abs().sum() == 0
    assert r.min() == -100.0  # clipped
    got = advantages(r, batch.label_mask, 0.95, block_width=block_width)
    assert got.tolist() == pytest.approx(_naive_advantages(expected, 0.95, block_width), rel=1e-5, abs=1e-6)


def test_advantages_are_whitened_over_the_micro_batches_of_all_processes(tokenizer):
    """Two processes (threads with a summing all-reduce), each with one of two
    rollouts: the reference all-reduces the whitening statistics, so each gets
    its rows of the advantages of the joint two-row micro-batch."""
    teacher_lp, old_lp = [[-1.0, -2.0, -0.5, -3.0], [-0.2, -4.0]], [[-1.5, -1.0, -0.5, -2.0], [-0.4, -1.0]]
    opts = MiniLLMOptions()
    joint = _rollout_batch(tokenizer, teacher_lp, old_lp)
    want = advantages(rewards(joint, opts), joint.label_mask, 0.95, block_width=6)
    halves = [_rollout_batch(tokenizer, [t], [o], prompt_lengths=(p,), response_lengths=(len(t),))
              for t, o, p in zip(teacher_lp, old_lp, (3, 5))]
    barrier, slots, got = threading.Barrier(2), [None, None], [None, None]

    def all_reduce(rank: int, tensor: torch.Tensor) -> torch.Tensor:
        slots[rank] = tensor
        barrier.wait()
        total = slots[0] + slots[1]
        barrier.wait()  # nobody overwrites a slot before both have read it
        return total

    def process(rank: int) -> None:
        half = halves[rank]
        got[rank] = advantages(rewards(half, opts), half.label_mask, 0.95, block_width=6,
                               global_sum=lambda tensor: all_reduce(rank, tensor))

    threads = [threading.Thread(target=process, args=(rank,)) for rank in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert torch.cat(got).tolist() == pytest.approx(want.tolist(), rel=1e-6, abs=1e-7)
    alone = advantages(rewards(halves[0], opts), halves[0].label_mask, 0.95, block_width=6)
    assert alone.tolist() != pytest.approx(got[0].tolist(), abs=1e-3)  # the reduction matters


def _minillm_run(recipe_file, tokenizer):
    """A MiniLLM run with a frozen tiny teacher, the student in eval mode (as
    the trainer runs MiniLLM's stage) and a batch of three examples."""
    examples = instruction_examples(tokenizer)
    run = make_run(recipe_file, tokenizer, method="minillm")
    run.teacher = FrozenTeacher(tiny_model(tokenizer, seed=9, n_embd=48), run)
    run.student.eval()
    batch = collate([e.prompt_ids for e in examples], [e.response_ids for e in examples], tokenizer.pad_token_id)
    return run, batch


def test_clipped_importance_weighted_policy_gradient(recipe_file, tokenizer):
    """L_PG with rho = exp(log q - log q_old) * w, clipped to [1 - eps, 1 + eps], against a per-token loop."""
    run, batch = _minillm_run(recipe_file, tokenizer)
    mask = batch.label_mask
    with torch.no_grad():
        student_lp = run.student_logits(batch).double().log_softmax(-1).gather(-1, batch.labels[..., None])[..., 0]
        teacher_logits = run.teacher_logits(batch)
        teacher_lp = teacher_logits.double().log_softmax(-1).gather(-1, batch.labels[..., None])[..., 0]
    torch.manual_seed(0)
    old = (student_lp + 0.3 * torch.randn_like(student_lp)) * mask  # a policy that has moved since the rollout
    rollout = RolloutBatch(batch.input_ids, batch.attention_mask, batch.response_mask, old.float(),
                           (teacher_lp * mask).float(), teacher_logits, batch)
    opts: MiniLLMOptions = run.options
    terms = minillm_loss(run, rollout)

    data = run.config.recipe.data
    adv = advantages(rewards(rollout, opts), mask, opts.gamma,
                     block_width=data.max_length - data.max_prompt_length).double()
    alpha, eps = opts.teacher_mix, opts.clip_ratio
    losses = []
    for a, lq, lo, lp in zip(adv.tolist(), student_lp[mask].tolist(), old[mask].tolist(), teacher_lp[mask].tolist()):
        w = math.exp(lo) / ((1 - alpha) * math.exp(lo) + alpha * math.exp(lp))
        rho = math.exp(lq - lo) * w
        losses.append(max(-a * rho, -a * min(max(rho, 1 - eps), 1 + eps)))
    assert terms["pg"].item() == pytest.approx(sum(losses) / len(losses), rel=1e-4, abs=1e-6)
    assert 0 < terms["clipped"].item() < 1  # both branches of the clip are exercised


def test_single_step_term_is_exact_reverse_kl_with_gradient_to_student_only(recipe_file, tokenizer):
    run, batch = _minillm_run(recipe_file, tokenizer)
    mask = batch.label_mask
    zeros = torch.zeros(mask.shape)
    teacher_logits = run.teacher_logits(batch)
    rollout = RolloutBatch(batch.input_ids, batch.attention_mask, batch.response_mask, zeros, zeros, None, batch)
    terms = minillm_loss(run, rollout)  # teacher logits recomputed (keep_teacher_logits = False path)
    logq = run.student_logits(batch).double().log_softmax(-1)[mask]
    logp = teacher_logits.double().log_softmax(-1)[mask]
    naive = (logq.exp() * (logq - logp)).sum(-1).mean()
    assert terms["single_step"].item() == pytest.approx(naive.item(), rel=1e-5)
    cached = RolloutBatch(batch.input_ids, batch.attention_mask, batch.response_mask, zeros, zeros, teacher_logits,
                          batch)
    assert minillm_loss(run, cached)["single_step"].item() == pytest.approx(terms["single_step"].item(), rel=1e-6)
    terms["single_step"].backward()
    assert all(p.grad is None for p in run.teacher.model.parameters())
    assert any(p.grad is not None for p in run.student.parameters())


def _rollout_source(recipe_file, tokenizer, monkeypatch, **options):
    examples = instruction_examples(tokenizer, texts=[f"Question number {i}?" for i in range(8)])
    run = make_run(recipe_file, tokenizer, method="minillm", overrides=["training.batch_size=4"], examples=examples)
    run.teacher = FrozenTeacher(tiny_model(tokenizer, seed=9, n_embd=48), run)
    source = registry().sources["rollouts"].build(run, **options)
    collections = []
    original = type(source)._collect
    monkeypatch.setattr(type(source), "_collect", lambda self: collections.append(1) or original(self))
    return run, examples, source, collections


def test_rollout_buffer_serves_each_rollout_once_per_ppo_epoch(recipe_file, tokenizer, monkeypatch):
    run, examples, source, collections = _rollout_source(recipe_file, tokenizer, monkeypatch, size=8, epochs=2)
    served = []
    for _ in range(4):  # 2 passes x 8 rollouts / 4 per call
        batch = source(examples[:4])
        assert isinstance(batch, RolloutBatch) and batch.lm.input_ids.shape[0] == 4
        served += [tuple(row[m].tolist()) for row, m in zip(batch.input_ids, batch.response_mask)]
    assert len(collections) == 1
    assert sorted(served[:8]) == sorted(served[8:])  # the second pass replays the same rollouts
    source(examples[:4])
    assert len(collections) == 2  # after ppo_epochs passes: new rollouts
    prompts = {tuple(e.prompt_ids) for e in examples}
    assert {tuple(r["prompt"]) for r in source.rollouts} <= prompts


def test_rollout_log_probs_are_those_of_the_models(recipe_file, tokenizer, monkeypatch):
    run, examples, source, _ = _rollout_source(recipe_file, tokenizer, monkeypatch, size=4, epochs=1)
    batch = source(examples[:4])
    mask = batch.label_mask
    run.student.eval()
    with torch.no_grad():
        student = run.student_logits(batch).log_softmax(-1).gather(-1, batch.labels[..., None])[..., 0]
        teacher = run.teacher_logits(batch)
    assert torch.allclose(batch.old_logprobs[mask], student[mask], atol=1e-5)
    teacher_lp = teacher.log_softmax(-1).gather(-1, batch.labels[..., None])[..., 0]
    assert torch.allclose(batch.teacher_logprobs[mask], teacher_lp[mask], atol=1e-5)
    assert torch.allclose(batch.teacher_logits[mask], teacher[mask], atol=1e-5)
    assert batch.old_logprobs[~mask].abs().sum() == 0


def test_rollout_size_and_filtered_sampling_are_refused_when_the_run_is_assembled(recipe_file):
    from distillkit.config import load_recipe, resolve_run

    recipe = load_recipe(str(recipe_file()), ["methods.minillm.rollout_size=6"])  # batch_size = 8
    with pytest.raises(DistillkitError, match=r"'methods.minillm.rollout_size' must be a multiple of "
                                              r"training.batch_size \(8\)"):
        resolve_run(recipe, "minillm")
    with pytest.raises(DistillkitError, match="plain sampling: set generation.top_k = 0"):
        resolve_run(load_recipe(str(recipe_file()), ["generation.top_k=5"]), "minillm")
