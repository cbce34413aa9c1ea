"""Teacher adapters, pseudo-target sources and PromptKD's invariants."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from distillkit.api import collate
from distillkit.builtins.teacher_adapters import FrozenTeacher, LoraTeacher, SoftPromptTeacher, initial_prompt
from distillkit.config import GenerationConfig, ModelConfig
from distillkit.engine.models import load_model, load_tokenizer
from distillkit.engine.sampling import sample
from distillkit.errors import DistillkitError
from distillkit.registry import registry
from distillkit.training.checkpoints import load_state
from distillkit.training.pipeline import train
from distillkit.training.run import Run

from .conftest import assert_same_tensors, instruction_examples, make_run, tiny_model, train_killed_during_step


def _batch(tokenizer, examples):
    return collate([e.prompt_ids for e in examples], [e.response_ids for e in examples], tokenizer.pad_token_id)


def test_text_init_cycles_or_truncates_the_text_tokens(tokenizer):
    model = tiny_model(tokenizer, seed=1)
    ids = tokenizer("Suppose you are a student.", add_special_tokens=False)["input_ids"]
    table = model.get_input_embeddings().weight
    for length in (3, len(ids), len(ids) + 4):
        prompt = initial_prompt(model, tokenizer, length, "text", "Suppose you are a student.")
        expected = torch.stack([table[ids[i % len(ids)]] for i in range(length)])
        assert torch.equal(prompt, expected.detach())
    padding = initial_prompt(model, tokenizer, 5, "padding", "")
    assert torch.equal(padding, table[[tokenizer.pad_token_id] * 5].detach())
    assert initial_prompt(model, tokenizer, 5, "random", "").shape == (5, table.shape[1])


def test_soft_prompt_gradients_reach_only_the_prompt(recipe_file, tokenizer):
    run = make_run(recipe_file, tokenizer)
    teacher_model = tiny_model(tokenizer, n_layer=2, seed=3)
    adapter = SoftPromptTeacher(teacher_model, run, length=4)
    batch = _batch(tokenizer, instruction_examples(tokenizer))
    logits = adapter.logits(batch, grad=True)
    assert logits.shape == (3, batch.input_ids.shape[1] - 1, teacher_model.config.vocab_size)
    logits.sum().backward()
    assert adapter.prompt.weight.grad is not None and adapter.prompt.weight.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in teacher_model.parameters())
    assert not teacher_model.training  # back in eval mode after the grad pass
    plain = FrozenTeacher(teacher_model, run).logits(batch)
    assert torch.equal(adapter.logits(batch, adapted=False), plain)
    assert not torch.allclose(adapter.logits(batch), plain)  # the prompt changes the distribution


def test_samples_leave_room_for_the_soft_prompt_in_the_teacher_positions(recipe_file, tokenizer):
    """A 128-position teacher, data.max_length 128, a 7-token prompt: samples stop at 121 tokens in all, and a
    longer sequence is refused with a clear error instead of an index error in the position embeddings."""
    run = make_run(recipe_file, tokenizer, overrides=["generation.max_new_tokens=0"])  # 0: fill max_length
    run.teacher = SoftPromptTeacher(tiny_model(tokenizer, seed=3, n_positions=128), run, length=7)
    prompt = instruction_examples(tokenizer)[0].prompt_ids
    prompts = [(prompt * 20)[:110]] * 3
    responses = run.sample(run.student, prompts)
    assert max(len(r) for r in responses) <= 128 - 7 - 110
    assert run.teacher.logits(collate(prompts, responses, tokenizer.pad_token_id)).shape[1] > 0
    too_long = collate([(prompt * 20)[:125]], [[5]], tokenizer.pad_token_id)
    with pytest.raises(DistillkitError, match="exceeds the teacher's 128 positions; lower data.max_length to 121"):
        run.teacher.logits(too_long)


def test_sampler_prefix_matches_a_manual_prompted_forward(tokenizer):
    model = tiny_model(tokenizer, n_layer=2, seed=3).eval()
    prefix = torch.randn(4, model.config.n_embd)
    prompts = [e.prompt_ids for e in instruction_examples(tokenizer)]
    ours = sample(model, prompts, GenerationConfig(max_new_tokens=5, temperature=0), eos_token_id=-1,
                  pad_token_id=tokenizer.pad_token_id, vocab_size=len(tokenizer), prefix_embeds=prefix)
    for prompt, response in zip(prompts, ours):
        ids = list(prompt)
        for token in response:  # greedy decoding without cache, prompt embeddings prepended
            embeds = torch.cat([prefix[None], model.get_input_embeddings()(torch.tensor([ids]))], dim=1)
            with torch.no_grad():
                expected = model(inputs_embeds=embeds).logits[0, -1, : len(tokenizer)].argmax().item()
            assert token == expected
            ids.append(token)


def test_lora_trains_only_adapter_and_keeps_base(recipe_file, tokenizer):
    run = make_run(recipe_file, tokenizer)
    teacher_model = tiny_model(tokenizer, n_layer=2, seed=3)
    base = [(p, p.detach().clone()) for p in teacher_model.parameters()]  # peft wraps these same tensors
    adapter = LoraTeacher(teacher_model, run, rank=4, alpha=8)
    params = adapter.trainable_parameters()
    assert params and all("lora" in name for name, p in adapter.model.named_parameters() if p.requires_grad)
    batch = _batch(tokenizer, instruction_examples(tokenizer))
    assert torch.allclose(adapter.logits(batch), adapter.logits(batch, adapted=False))  # LoRA B starts at zero
    optimizer = torch.optim.AdamW(params, lr=0.1)
    adapter.logits(batch, grad=True).logsumexp(-1).mean().backward()
    optimizer.step()
    assert not torch.allclose(adapter.logits(batch), adapter.logits(batch, adapted=False))
    assert all(torch.equal(param, before) for param, before in base)


def test_student_source_masks_sampled_response_only(recipe_file, tokenizer):
    examples = instruction_examples(tokenizer)
    run = make_run(recipe_file, tokenizer)
    torch.manual_seed(0)
    batch = registry().sources["student"].build(run)(examples)
    for row, example in enumerate(examples):
        start = len(example.prompt_ids)
        assert not batch.response_mask[row, :start].any()
        assert torch.equal(batch.input_ids[row, :start], torch.tensor(example.prompt_ids))
        sampled = batch.input_ids[row, batch.response_mask[row]].tolist()
        assert 0 < len(sampled) <= run.config.recipe.generation.max_new_tokens
        assert tokenizer.eos_token_id not in sampled[:-1]  # nothing kept after the first EOS


@pytest.mark.parametrize("fraction", [0.0, 0.25, 1.0])
def test_mixture_follows_its_probability(recipe_file, tokenizer, fraction):
    """Over 100 steps the share of steps on student samples is lambda: none at 0, every one at 1,
    about a quarter at 0.25 (training seed 3: 22 of 100; the binomial sd is 4.3)."""
    examples = instruction_examples(tokenizer)
    run = make_run(recipe_file, tokenizer)
    run.total_steps = 100
    source = registry().sources["mixture"].build(run, fraction=fraction)
    dataset = _batch(tokenizer, examples)
    on_policy = []
    for step in range(run.total_steps):
        run.step = step
        on_policy.append(not torch.equal(source(examples).input_ids, dataset.input_ids))
    assert sum(on_policy) / len(on_policy) == pytest.approx(fraction, abs=0.1 if 0 < fraction < 1 else 0)


@pytest.mark.parametrize("schedule", ["constant", "linear"])
def test_mixture_flips_one_seeded_coin_per_step(recipe_file, tokenizer, schedule):
    """lambda = 0.5 (times the schedule at k = 1..K): step k takes student samples
    exactly when its coin, seeded by (training seed, k), falls below lambda_k."""
    from distillkit.files import fingerprint

    examples = instruction_examples(tokenizer)
    run = make_run(recipe_file, tokenizer)
    run.total_steps = 40
    source = registry().sources["mixture"].build(run, fraction=0.5, schedule=schedule)
    dataset = _batch(tokenizer, examples)
    on_policy, expected = [], []
    for step in range(run.total_steps):
        run.step = step
        on_policy.append(not torch.equal(source(examples).input_ids, dataset.input_ids))
        seed = int(fingerprint(run.config.training.seed, "mixture", step), 16)
        coin = torch.rand((), generator=torch.Generator().manual_seed(seed)).item()
        expected.append(coin < 0.5 * (1.0 if schedule == "constant" else 1 - (step + 1) / run.total_steps))
    assert on_policy == expected
    assert 0 < sum(on_policy) < len(on_policy)  # both kinds occur
    if schedule == "constant":
        assert 0.3 <= sum(on_policy) / len(on_policy) <= 0.7
    else:  # lambda_k falls to 0: on-policy steps thin out towards the end
        assert sum(on_policy[:20]) > sum(on_policy[20:])


def test_teacher_generations_are_cached_and_reused(recipe_file, tokenizer, monkeypatch):
    examples = instruction_examples(tokenizer)
    run = make_run(recipe_file, tokenizer, method="seqkd", examples=examples)
    run.teacher = FrozenTeacher(tiny_model(tokenizer, seed=9), run)
    calls = []
    original = Run.sample
    monkeypatch.setattr(Run, "sample", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    first = registry().sources["teacher_cache"].build(run, seed=10)(examples)
    generated = len(calls)
    assert generated >= 1
    second = registry().sources["teacher_cache"].build(run, seed=10)(examples)
    assert len(calls) == generated  # read back from disk, not regenerated
    assert torch.equal(first.input_ids, second.input_ids)
    registry().sources["teacher_cache"].build(run, seed=11)
    assert len(calls) > generated  # another seed is another cache entry


def test_promptkd_changes_prompt_never_teacher_and_resumes_exactly(recipe_file, tmp_path, monkeypatch):
    recipe = str(recipe_file(steps=4, eval_every=2))
    train("promptkd", recipe, output=tmp_path / "straight")
    teacher_dir = (tmp_path / "straight" / "teacher").resolve()
    teacher_before = load_file(teacher_dir / "model.safetensors")
    prompt = load_file(tmp_path / "straight" / "best" / "teacher_adapter" / "adapter_model.safetensors")["prompt_embeddings"]
    assert prompt.shape[0] == 7
    records = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert {"teacher_adapter/l_kd", "teacher_adapter/l_reg", "student/loss"} <= set(records[0])
    c_k = [r["teacher_adapter/c_k"] for r in records if "teacher_adapter/c_k" in r]
    assert c_k == [0.75, 0.5, 0.25, 0.0]  # (K - k) / K with K = 4 and k = 1..K, as the reference counts

    train_killed_during_step(monkeypatch, 4, lambda: train("promptkd", recipe, output=tmp_path / "killed"))
    train("promptkd", recipe, output=tmp_path / "killed", resume=True)

    final = "checkpoints/step-0000004"
    assert_same_tensors(tmp_path / "straight" / final / "model.safetensors",
                        tmp_path / "killed" / final / "model.safetensors")
    states = [load_state(tmp_path / run / final / "run_state_0")["teacher_adapter/0"] for run in ("straight", "killed")]
    assert states[0]["weight"].shape == (7, 48), "the soft prompt must be part of the checkpoint"
    assert torch.equal(states[0]["weight"], states[1]["weight"])
    assert not any(p.name.startswith("custom_checkpoint") for p in (tmp_path / "straight" / final).iterdir())
    teacher_after = load_file(teacher_dir / "model.safetensors")
    assert all(torch.equal(teacher_before[k], teacher_after[k]) for k in teacher_before)
    teacher = load_model(ModelConfig(path=str(teacher_dir)), load_tokenizer(str(teacher_dir)), "teacher")
    start = initial_prompt(teacher, load_tokenizer(str(teacher_dir)), 7, "text", "Suppose you are a student.")
    assert not torch.allclose(prompt, start)  # the prompt trained
