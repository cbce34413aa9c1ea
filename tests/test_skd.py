"""Sampler rules and SKD: the top-K replacement against a naive per-token
loop that teacher-forces the final sequence through both models (so the KV
caches must have been fed the chosen tokens), a third-party rule through
``run.sample``, SKD end-to-end with exact resume, and its option errors."""

from __future__ import annotations

import json

import pytest
import torch

from distillkit.config import GenerationConfig
from distillkit.engine.sampling import gumbel_noise, sample
from distillkit.plugins.skd import top_k_replacement
from distillkit.training.pipeline import train

from .conftest import assert_same_tensors, instruction_examples, make_run, tiny_model, train_killed_during_step
from .test_declarations import _error

STREAM_1 = 0xD1B54A32D192ED03 - (1 << 64)  # the sampler's salt of noise stream 1 (int64)


def _stream_keys(keys: torch.Tensor) -> torch.Tensor:
    from distillkit.engine.sampling import _splitmix64_

    return _splitmix64_(keys + STREAM_1)


@pytest.mark.parametrize("share", [0.3, 0.6])
def test_rule_replaces_exactly_the_proposals_outside_the_teacher_top_k(tokenizer, share):
    student, teacher = tiny_model(tokenizer, seed=1), tiny_model(tokenizer, seed=2, n_embd=48)
    prompts = [e.prompt_ids for e in instruction_examples(tokenizer)]
    keys = [11, 22, 33]
    vocab = len(tokenizer)
    k = int(share * vocab)  # untrained models: a large K, so that proposals are both kept and replaced
    responses = sample(student, prompts, GenerationConfig(max_new_tokens=8), eos_token_id=-1,
                       pad_token_id=tokenizer.pad_token_id, vocab_size=vocab, row_keys=keys,
                       guide_model=teacher, rule=top_k_replacement(k))
    student.eval(), teacher.eval()
    replaced = kept = 0
    with torch.no_grad():
        for prompt, key, response in zip(prompts, keys, responses):
            assert len(response) == 8
            row = torch.tensor([key])
            for step, token in enumerate(response):  # teacher-force the final sequence, no cache
                ids = torch.tensor([prompt + response[:step]])
                q = student(ids).logits[0, -1, :vocab].float().log_softmax(-1)
                p = teacher(ids).logits[0, -1, :vocab].float().log_softmax(-1)
                proposal = int((q + gumbel_noise(row, step, vocab)[0]).argmax())
                if proposal in p.topk(k).indices.tolist():
                    expected, kept = proposal, kept + 1
                else:
                    expected = int((p + gumbel_noise(_stream_keys(row), step, vocab)[0]).argmax())
                    replaced += 1
                assert token == expected, (step, token, expected)
    assert replaced > 0 and kept > 0  # both branches were exercised


def test_a_third_party_rule_works_through_run_sample(recipe_file, tokenizer):
    run = make_run(recipe_file, tokenizer)
    teacher = tiny_model(tokenizer, seed=2, n_embd=48)
    prompts = [e.prompt_ids for e in instruction_examples(tokenizer)]

    def the_guide_decides(scores, guide_scores, draw):  # a rule from outside the package
        return draw(guide_scores)

    guided = run.sample(run.student, prompts, guide_model=teacher, rule=the_guide_decides)
    assert guided == run.sample(teacher, prompts)  # stream-0 noise on the guide's scores: the guide's own sample
    assert guided != run.sample(run.student, prompts)


def test_skd_trains_with_falling_loss_and_resumes_exactly(recipe_file, tmp_path, monkeypatch):
    recipe = str(recipe_file(steps=4, eval_every=2))
    train("skd", recipe, output=tmp_path / "straight")
    records = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    losses = [r.get("loss", r.get("student/loss")) for r in records if "val/rougeL" not in r]
    assert len(losses) == 4 and losses[-1] < losses[0], losses
    train_killed_during_step(monkeypatch, 3, lambda: train("skd", recipe, output=tmp_path / "killed"))
    train("skd", recipe, output=tmp_path / "killed", resume=True)
    final = "checkpoints/step-0000004"
    assert_same_tensors(tmp_path / "straight" / final / "model.safetensors",
                        tmp_path / "killed" / final / "model.safetensors")


@pytest.mark.parametrize(("setting", "message"), [
    ("methods.skd.top_k=0", "'methods.skd.top_k' must be >= 1, got 0"),
    ('methods.skd.divergence="kl"', "methods.skd.divergence"),
])
def test_skd_option_errors_at_assembly(recipe_file, monkeypatch, setting, message):
    assert message in _error(recipe_file, monkeypatch, "skd", setting)
