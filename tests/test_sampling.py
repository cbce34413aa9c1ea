"""The sampler: left padding, KV cache, EOS handling, reproducibility."""

from __future__ import annotations

import math

import pytest
import torch

from distillkit.config import GenerationConfig
from distillkit.engine.sampling import gumbel_noise, sample, standard_gumbel

from .conftest import tiny_model

GREEDY = GenerationConfig(max_new_tokens=12, temperature=0)


def _run(model, tokenizer, prompts, settings=GREEDY, seed=None):
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    return sample(model, prompts, settings, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                  vocab_size=len(tokenizer), generator=generator)


def _prompts(tokenizer):
    texts = ["### Instruction:\nName a colour.\n\n### Response:\n", "Hi", "Tell me about cats and dogs please"]
    return [tokenizer(t)["input_ids"] for t in texts]


def test_batched_left_padded_equals_one_by_one(tokenizer):
    model = tiny_model(tokenizer, n_layer=2, seed=1)
    prompts = _prompts(tokenizer)
    batched = _run(model, tokenizer, prompts)
    assert batched == [_run(model, tokenizer, [p])[0] for p in prompts]


def test_greedy_matches_model_generate_without_cache_tricks(tokenizer):
    model = tiny_model(tokenizer, n_layer=2, seed=1).eval()
    prompt = _prompts(tokenizer)[0]
    expected = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    ours = _run(model, tokenizer, [prompt])[0]
    reference = expected[0, len(prompt):].tolist()
    if tokenizer.eos_token_id in reference:
        reference = reference[: reference.index(tokenizer.eos_token_id) + 1]
    assert ours == reference


def test_stops_at_eos_and_keeps_it(tokenizer):
    model = tiny_model(tokenizer, seed=3)
    with torch.no_grad():  # make EOS the most likely token after two steps of anything
        model.get_output_embeddings().weight.zero_()
        model.transformer.ln_f.bias.zero_()
    eos = tokenizer.eos_token_id
    head = model.get_output_embeddings()
    head.bias = torch.nn.Parameter(torch.full((head.weight.shape[0],), -10.0))
    head.bias.data[eos] = 10.0
    out = _run(model, tokenizer, _prompts(tokenizer))
    assert out == [[eos]] * 3


def test_sampling_is_reproducible_and_seed_dependent(tokenizer):
    model = tiny_model(tokenizer, seed=4)
    settings = GenerationConfig(max_new_tokens=10)
    prompts = _prompts(tokenizer)
    state = torch.get_rng_state()
    first = _run(model, tokenizer, prompts, settings, seed=1)
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is untouched
    assert first == _run(model, tokenizer, prompts, settings, seed=1)
    assert first != _run(model, tokenizer, prompts, settings, seed=2)
    assert all(len(r) <= 10 for r in first)


def test_no_repeat_ngram_size_bans_repeated_ngrams(tokenizer):
    """Greedy decoding of a tiny model loops; with the n-gram ban no n-gram of prompt + response occurs twice."""
    model = tiny_model(tokenizer, n_layer=2, seed=1)
    prompt = tokenizer("Hi")["input_ids"]

    def repeats(size: int) -> int:
        settings = GenerationConfig(max_new_tokens=30, temperature=0, no_repeat_ngram_size=size)
        sequence = prompt + sample(model, [prompt], settings, eos_token_id=-1, pad_token_id=tokenizer.pad_token_id,
                                   vocab_size=len(tokenizer))[0]
        grams = [tuple(sequence[i : i + 3]) for i in range(len(sequence) - 2)]
        return len(grams) - len(set(grams))

    assert repeats(0) > 0 and repeats(3) == 0


def test_generation_settings_overrides():
    generation = GenerationConfig(temperature=0.7, max_new_tokens=8, batch_size=4)
    evaluation = generation.with_overrides(max_new_tokens=0, no_repeat_ngram_size=6)  # e.g. [eval]'s
    assert (evaluation.max_new_tokens, evaluation.no_repeat_ngram_size, evaluation.temperature) == (0, 6, 0.7)
    assert generation.with_overrides(max_new_tokens=None) == generation and generation.max_new_tokens == 8


def test_padded_vocabulary_rows_are_never_sampled(tokenizer):
    model = tiny_model(tokenizer, vocab_size=len(tokenizer) + 50, seed=5)
    with torch.no_grad():
        model.get_output_embeddings().weight[len(tokenizer):] = 0
    head = model.get_output_embeddings()
    head.bias = torch.nn.Parameter(torch.zeros(head.weight.shape[0]))
    head.bias.data[len(tokenizer):] = 50.0  # padded rows would win without slicing
    out = _run(model, tokenizer, _prompts(tokenizer), GenerationConfig(max_new_tokens=8), seed=0)
    assert max(max(r) for r in out) < len(tokenizer)


def _splitmix64(x: int) -> int:
    """The reference splitmix64 finaliser on Python integers."""
    mask = (1 << 64) - 1
    x &= mask
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
    return x ^ (x >> 31)


def test_gumbel_noise_matches_a_pure_python_reference():
    golden = 0x9E3779B97F4A7C15
    keys = [0, 123_456_789, (1 << 47) + 5]
    noise = gumbel_noise(torch.tensor(keys), 3, 9)
    for row, key in enumerate(keys):
        hashed = _splitmix64(key + 4 * golden)
        for column in range(9):
            uniform = ((_splitmix64(hashed + column * golden) >> 40) + 0.5) / 2**24
            assert noise[row, column].item() == pytest.approx(-math.log(-math.log(uniform)), abs=1e-5)


def test_gumbel_noise_is_standard_gumbel():
    noise = gumbel_noise(torch.arange(64), 0, 4096).double()
    assert noise.mean().item() == pytest.approx(0.5772, abs=0.01)  # Euler-Mascheroni constant
    assert noise.std().item() == pytest.approx(math.pi / math.sqrt(6), abs=0.01)


def test_row_keys_make_a_sample_independent_of_its_batch_mates(tokenizer):
    model = tiny_model(tokenizer, n_layer=2, seed=1)
    prompts = _prompts(tokenizer)
    settings = GenerationConfig(max_new_tokens=12)

    def draw(chosen, keys):
        return sample(model, [prompts[i] for i in chosen], settings, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id, vocab_size=len(tokenizer), row_keys=keys)

    together = draw([0, 1, 2], [11, 12, 13])
    assert [draw([i], [key])[0] for i, key in zip([0, 1, 2], [11, 12, 13])] == together
    assert draw([2, 0], [13, 11]) == [together[2], together[0]]
    assert len({tuple(draw([0], [key])[0]) for key in range(20)}) > 1  # other keys, other samples


def test_max_length_caps_each_row_by_its_own_prompt(tokenizer):
    """Every row fills up to max_length whatever its batch-mates' prompt lengths are, and
    finished rows stop advancing: no position beyond the model's last one is used."""
    short, long = _prompts(tokenizer)[1], _prompts(tokenizer)[0]
    model = tiny_model(tokenizer, n_layer=2, seed=1, n_positions=len(long) + 6)
    settings = GenerationConfig(max_new_tokens=0)

    def draw(chosen, keys):
        return sample(model, chosen, settings, eos_token_id=-1, pad_token_id=tokenizer.pad_token_id,
                      vocab_size=len(tokenizer), row_keys=keys, max_length=len(long) + 6)

    together = draw([short, long], [1, 2])
    assert [len(r) for r in together] == [len(long) + 6 - len(short), 6]
    assert draw([short], [1]) == together[:1] and draw([long], [2]) == together[1:]


def test_processes_kept_in_step_run_extra_passes_without_changing_samples(tokenizer):
    """With a sharded model every process runs forward passes until all are done
    (``keep_going``); a process already finished must still return its own samples."""
    model = tiny_model(tokenizer, n_layer=2, seed=1, n_positions=44)  # 40 + 20 extra passes would overflow it
    prompts = _prompts(tokenizer)[1:]
    settings = GenerationConfig(max_new_tokens=0)
    extra = []

    def other_process_still_sampling(unfinished: bool) -> bool:
        extra.append(not unfinished)
        return unfinished or sum(extra) <= 20  # 20 more passes after this process is done

    def draw(**kwargs):
        return sample(model, prompts, settings, eos_token_id=-1, pad_token_id=tokenizer.pad_token_id,
                      vocab_size=len(tokenizer), row_keys=[5, 6], max_length=40, **kwargs)

    assert draw(keep_going=other_process_still_sampling) == draw()
    assert sum(extra) == 21


def _dolly_prompts(tokenizer, count: int) -> list[list[int]]:
    """The first ``count`` Dolly validation prompts in the Alpaca template, the i-th cut
    to its last 12 + 5 i tokens (of this 300-token vocabulary's 60 or more)."""
    from distillkit.config import DataConfig
    from distillkit.data.loading import load_split
    from distillkit.data.tokenization import tokenize

    examples, _ = tokenize(load_split(DataConfig(dataset="dolly"), "validation")[:count], tokenizer,
                           max_prompt_length=60, max_length=100, long_prompts="cut_left")
    return [e.prompt_ids[-(12 + 5 * i):] for i, e in enumerate(examples)]


def _recording_batch_sizes(model) -> list[tuple[int, int]]:
    """(rows, positions) of every forward pass of ``model`` from now on."""
    calls: list[tuple[int, int]] = []
    model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(tuple(kwargs["input_ids"].shape)),
                                    with_kwargs=True)
    return calls


def _tiny_llama(tokenizer):
    """A 2-layer Llama with grouped-query attention (4 heads, 2 key/value heads), as SmolLM2."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    return LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=128))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("settings", [GenerationConfig(max_new_tokens=0, no_repeat_ngram_size=3),
                                      GenerationConfig(max_new_tokens=0, temperature=0)], ids=["sampled", "greedy"])
def test_continuous_batching_samples_what_each_row_samples_alone(tokenizer, settings, arch):
    """With row keys, rows leave the batch when they end and the next prompts join the
    running cache; every row still gets exactly the tokens it gets sampled alone."""
    model = tiny_model(tokenizer, n_layer=2, seed=1, n_positions=128) if arch == "gpt2" else _tiny_llama(tokenizer)
    prompts = _dolly_prompts(tokenizer, 10)
    keys = list(range(100, 110))
    options = dict(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                   vocab_size=len(tokenizer), max_length=80)  # budgets of 23-68 tokens: rows end at different steps
    alone = [sample(model, [p], settings, row_keys=[k], **options)[0] for p, k in zip(prompts, keys)]
    calls = _recording_batch_sizes(model)
    together = sample(model, prompts, settings, row_keys=keys, batch_size=4, **options)
    assert together == alone
    assert max(rows for rows, _ in calls) == 4
    decoded = [i for i, (_, positions) in enumerate(calls) if positions == 1]
    joined_midway = [i for i, (_, positions) in enumerate(calls) if positions > 1 and decoded[0] < i < decoded[-1]]
    assert joined_midway, "no prompt joined a running batch"
    assert sum(rows for rows, positions in calls if positions == 1) < sum(map(len, alone)) + 4


def test_continuous_batching_with_a_guide_and_a_prefix(tokenizer):
    """A guide model's cache and a soft prompt's slots follow the rows as they leave and join."""
    model = tiny_model(tokenizer, n_layer=2, seed=1, n_positions=128)
    guide = tiny_model(tokenizer, n_layer=1, seed=2, n_positions=128)
    prompts = _dolly_prompts(tokenizer, 7)
    prefix = torch.randn(3, 32, generator=torch.Generator().manual_seed(0))

    def mix(scores, guide_scores, draw):
        return draw((scores.log_softmax(-1) + guide_scores.log_softmax(-1)) / 2)

    def run(chosen, batch_size=0):
        return sample(model, [prompts[i] for i in chosen], GenerationConfig(max_new_tokens=0),
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                      vocab_size=len(tokenizer), row_keys=[7 * i for i in chosen], max_length=75,
                      prefix_embeds=prefix, guide_model=guide, rule=mix, batch_size=batch_size)

    assert run(range(7), batch_size=3) == [run([i])[0] for i in range(7)]


def test_generator_draws_run_in_consecutive_batches(tokenizer):
    """One generator: prompts run batch after batch, each row kept until its batch ends,
    so the draws are those of separate calls on the same generator."""
    model = tiny_model(tokenizer, n_layer=2, seed=1, n_positions=128)
    prompts = _dolly_prompts(tokenizer, 5)
    settings = GenerationConfig(max_new_tokens=10)

    def run(group, generator, batch_size=0):
        return sample(model, group, settings, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                      vocab_size=len(tokenizer), generator=generator, batch_size=batch_size)

    generator = torch.Generator().manual_seed(3)
    separately = run(prompts[:2], generator) + run(prompts[2:4], generator) + run(prompts[4:], generator)
    assert run(prompts, torch.Generator().manual_seed(3), batch_size=2) == separately


def test_a_sharded_model_samples_in_one_batch(tokenizer):
    model = tiny_model(tokenizer, n_layer=1)
    with pytest.raises(ValueError, match="one batch"):
        sample(model, _prompts(tokenizer), GREEDY, eos_token_id=0, pad_token_id=0, vocab_size=len(tokenizer),
               keep_going=lambda unfinished: unfinished, batch_size=2)


def test_gumbel_noise_stays_finite_at_the_top_bit_pattern():
    """The largest 24-bit value would give u = 1.0 in float32 and infinite noise (about one
    column in 2^24: 0.3% of SmolLM2's draws), drawing that token whatever its score."""
    bits = torch.tensor([0, 1, (1 << 23) + 1, (1 << 24) - 2, (1 << 24) - 1])
    noise = standard_gumbel(bits)
    unclamped = -torch.log(-torch.log((bits.float() + 0.5) / 2**24))
    assert torch.isinf(unclamped[-1]) and torch.equal(noise[:-1], unclamped[:-1])  # only the top value changes
    assert noise[-1] == pytest.approx(-math.log(2.0**-24), rel=1e-3)  # the largest finite noise, 16.6
