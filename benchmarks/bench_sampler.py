"""Throughput of distillkit's sampler against 🤗 ``generate``, side by side.

    python benchmarks/bench_sampler.py [--repeats N] [--quick]
    python benchmarks/bench_sampler.py --smollm2 [--prompts 64] [--threads 2]

``--smollm2`` measures the evaluation protocol on real weights instead (see
:func:`smollm2_comparison`).  Otherwise:

Both arms sample the same left-padded batch of real Dolly validation prompts
(top-k 0, top-p 1.0, temperature 1.0, ``max_new_tokens`` N) from GPT-2
models with random weights, at two sizes.  They run in one process,
interleaved, with the same seed per repeat: ``sample`` draws from a seeded
``torch.Generator`` and ``generate`` from the global RNG seeded with the
same value, so both draw the *same tokens* -- the script checks that the
sequences are identical, hence that both arms did the same work.  A third
arm, ``sample (row keys)``, is the training path (``Run.sample``): per-row
counter-based Gumbel noise instead of one generator; it draws other tokens,
so its row "steps" shows that it decoded as many positions.
Throughput counts every decoded position (batch x steps), the work both arms
do whether or not a row has emitted EOS.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

from distillkit.api import left_pad  # noqa: E402
from distillkit.files import fingerprint  # noqa: E402

SIZES = {  # name: GPT-2 config
    "L4-d256 (tiny teacher)": {"n_layer": 4, "n_embd": 256, "n_head": 4},
    "L6-d512": {"n_layer": 6, "n_embd": 512, "n_head": 8},
}


def compare(model, prompts, tokenizer, n_new: int, repeats: int, seed: int) -> dict:
    """Time both arms on one model (rotated order, same seed per repeat) and
    check that they generated the same sequences."""
    import torch

    from distillkit.api import left_pad
    from distillkit.config import GenerationConfig
    from distillkit.engine.sampling import sample

    input_ids, attention_mask = left_pad(prompts, tokenizer.pad_token_id)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    settings = GenerationConfig(max_new_tokens=n_new, temperature=1.0, top_k=0, top_p=1.0)
    outputs: dict[str, list[list[int]]] = {}
    steps: dict[str, int] = {}

    def ours(rep: int) -> None:
        generator = torch.Generator().manual_seed(seed * 1000 + rep)
        out = sample(model, prompts, settings, eos_token_id=eos, pad_token_id=pad, vocab_size=len(tokenizer),
                     generator=generator)
        outputs["distillkit sample"], steps["distillkit sample"] = out, max(map(len, out))

    def keyed(rep: int) -> None:
        keys = [seed * 1000 + rep * 100 + row for row in range(len(prompts))]
        out = sample(model, prompts, settings, eos_token_id=eos, pad_token_id=pad, vocab_size=len(tokenizer),
                     row_keys=keys)
        steps["distillkit sample (row keys)"] = max(map(len, out))

    def hf(rep: int) -> None:
        torch.manual_seed(seed * 1000 + rep)  # the global RNG: generate draws the same tokens as ours
        with torch.no_grad():
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=True, top_k=0,
                                 top_p=1.0, temperature=1.0, max_new_tokens=n_new, pad_token_id=pad,
                                 eos_token_id=eos)
        new = out[:, input_ids.shape[1]:].tolist()
        outputs["HF generate"] = [r[: r.index(eos) + 1] if eos in r else r for r in new]
        steps["HF generate"] = len(new[0])

    arms = {"distillkit sample": ours, "HF generate": hf, "distillkit sample (row keys)": keyed}
    names = list(arms)
    times = {name: [] for name in names}
    identical, lengths = [], {name: [] for name in names}
    for rep in range(1 + repeats):  # repeat 0 is the warm-up
        for name in names[rep % len(names):] + names[: rep % len(names)]:  # rotated order
            started = time.perf_counter()
            arms[name](rep)
            if rep > 0:
                times[name].append(time.perf_counter() - started)
        if rep > 0:  # both arms drew with the same seed: compare what they generated
            identical.append(sum(a == b for a, b in zip(outputs["distillkit sample"], outputs["HF generate"])))
            for name, out in outputs.items():
                lengths[name].append(sum(map(len, out)))
    return {"times": times, "steps": steps, "identical": identical, "lengths": lengths}


def _machine_bounds(threads: int) -> tuple[float, float]:
    """This machine's fp32 matmul rate (GFLOP/s, a 2048^3 product) and copy
    bandwidth (GB/s read + written, a 512 MiB clone), best of 5 each."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    big = torch.empty(2**27).fill_(1.0)
    matmul, copy = [], []
    for _ in range(5):
        started = time.perf_counter()
        a @ b
        matmul.append(time.perf_counter() - started)
        started = time.perf_counter()
        big.clone()
        copy.append(time.perf_counter() - started)
    return 2 * 2048**3 / min(matmul) / 1e9, 2 * big.numel() * 4 / min(copy) / 1e9


def _bare_decode(model, batch: int, context: int, steps: int = 6) -> float:
    """Seconds of one bare ``model(...)`` decode step (median of ``steps`` - 1)
    at ``batch`` rows on a KV cache of ``context`` positions: the model alone,
    no sampling, no bookkeeping."""
    import torch

    with torch.no_grad():
        ids = torch.randint(0, model.config.vocab_size, (batch, context))
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        mask = torch.ones(batch, context, dtype=torch.long)
        times = []
        for _ in range(steps):
            mask = torch.cat([mask, torch.ones(batch, 1, dtype=torch.long)], dim=-1)
            started = time.perf_counter()
            out = model(input_ids=ids[:, -1:], attention_mask=mask, cache=out.cache, use_cache=True)
            times.append(time.perf_counter() - started)
    return sorted(times[1:])[len(times[1:]) // 2]


def smollm2_comparison(args: argparse.Namespace) -> None:
    """The evaluation protocol on SmolLM2-135M-Instruct (fp32, the paper's
    settings as the ``smollm2`` recipe evaluates them: top-k 0, top-p 1,
    temperature 1, no repeated 6-grams, but up to 512 positions, as the paper,
    not the recipe's 128 new tokens) on the first ``--prompts`` Dolly test prompts,
    one run per arm, in this order:

    - *fixed batches (before)*: the protocol before continuous batching --
      prompts sorted by length, ``batch_size`` per call, one generator, every
      row kept until its batch's longest ends -- run by this commit's sampler,
      so with its KV cache that grows in place (the code before copied the
      cache at every step): the ratios to it understate the gain over the
      code before;
    - *continuous* at ``batch_size`` and 2x: ``protocol.generate`` as
      ``distillkit eval`` runs it (row-keyed noise, finished rows leave, the
      next prompts join);
    - 🤗 ``generate`` in the same fixed batches (its own sampling loop; it stops
      a batch when all its rows are done).

    Tokens/s counts the response tokens returned (through EOS), as
    ``distillkit eval`` reports them.  Beside them: the bare decode step and the
    FLOP and bandwidth bounds of this machine; and the check that a row's
    continuous-batch sample is the one it gets sampled alone."""
    import torch
    from transformers import AutoModelForCausalLM

    from distillkit.config import load_recipe
    from distillkit.data.loading import dataset_spec, keep_long_references, load_eval_set
    from distillkit.data.tokenization import tokenize
    from distillkit.engine.models import load_tokenizer, materialize_gguf
    from distillkit.engine.sampling import sample
    from distillkit.evaluation.protocol import eval_setup, generate

    recipe = load_recipe("smollm2")
    folder = materialize_gguf(recipe.teacher.path, recipe.teacher.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(str(folder))
    setup = eval_setup(model, recipe, args.batch_size, print)
    settings, batch, max_length = setup.settings, setup.batch_size, setup.max_length
    settings = dataclasses.replace(settings, max_new_tokens=0)  # the paper's: up to max_length (the recipe caps at 128)
    if args.quick:
        max_length = min(max_length, 160)
    rows = keep_long_references(load_eval_set("dolly", recipe.data.prompt), tokenizer,
                                dataset_spec("dolly").min_reference_tokens)[: args.prompts]
    examples, _ = tokenize(rows, tokenizer, max_prompt_length=min(setup.max_prompt_length, max_length // 2),
                           max_length=max_length,
                           long_prompts="cut_left")
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].prompt_ids))
    prompts = [examples[i].prompt_ids for i in order]
    eos, pad, vocab = tokenizer.eos_token_id, tokenizer.pad_token_id, len(tokenizer)
    print(f"SmolLM2-135M-Instruct fp32, {_common.parameter_count(model) / 1e6:.1f}M parameters; {len(prompts)} Dolly "
          f"test prompts of {len(prompts[0])}-{len(prompts[-1])} tokens; up to {max_length} positions; "
          f"batch {batch}; settings {settings}\n")

    def fixed() -> list[list[int]]:
        generator = torch.Generator().manual_seed(args.seed)
        return sample(model, prompts, settings, eos_token_id=eos, pad_token_id=pad, vocab_size=vocab,
                      generator=generator, max_length=max_length, batch_size=batch)

    def continuous(size: int) -> list[list[int]]:
        return generate(model, tokenizer, examples, settings, seed=args.seed, batch_size=size, max_length=max_length)

    def hf() -> list[list[int]]:
        torch.manual_seed(args.seed)
        out = []
        for start in range(0, len(prompts), batch):
            group = prompts[start : start + batch]
            input_ids, attention_mask = left_pad(group, pad)
            with torch.no_grad():
                ids = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=True, top_k=0,
                                     top_p=1.0, temperature=1.0, no_repeat_ngram_size=settings.no_repeat_ngram_size,
                                     max_new_tokens=max_length - len(group[-1]), pad_token_id=pad, eos_token_id=eos)
            out += [r[: r.index(eos) + 1] if eos in r else r for r in ids[:, input_ids.shape[1] :].tolist()]
        return out

    arms = {"fixed batches (before)": fixed, f"continuous, batch {batch}": lambda: continuous(batch),
            f"continuous, batch {2 * batch}": lambda: continuous(2 * batch), "HF generate, fixed batches": hf}
    results, seconds = {}, {}
    for name, arm in arms.items():
        started = time.perf_counter()
        results[name] = arm()
        seconds[name] = time.perf_counter() - started
        print(f"  {name}: {sum(map(len, results[name])):,} tokens in {seconds[name]:.0f} s", flush=True)
    rates = {name: sum(map(len, results[name])) / seconds[name] for name in arms}

    gflops, bandwidth = _machine_bounds(args.threads)
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    context = 256
    flops_per_token = 2 * _common.parameter_count(model) + 4 * config.num_hidden_layers * config.hidden_size * context
    weight_bytes = 4 * _common.parameter_count(model)
    kv_bytes_per_row = 2 * 4 * config.num_hidden_layers * config.num_key_value_heads * head_dim * context
    table_rows = [[name, f"{sum(map(len, results[name])):,}", f"{seconds[name]:.0f}", f"{rates[name]:.1f}",
                   f"{rates[name] / rates['fixed batches (before)']:.2f}"] for name in arms]
    for size in (batch, 2 * batch):
        step = _bare_decode(model, size, context)
        bound = size / max(flops_per_token * size / (gflops * 1e9), (weight_bytes + size * kv_bytes_per_row) / (bandwidth * 1e9))
        table_rows.append([f"bare decode step, batch {size}, cache {context}", "", f"{step:.3f} per step",
                           f"{size / step:.1f}", f"{size / step / rates['fixed batches (before)']:.2f}"])
        table_rows.append([f"bound at batch {size}: max(FLOPs / {gflops:.0f} GFLOP/s, bytes / {bandwidth:.1f} GB/s)",
                           "", "", f"{bound:.1f}", ""])
    print()
    print(_common.table(["arm", "tokens", "seconds", "tokens/s", "× fixed batches"], table_rows))
    print(f"\n{flops_per_token / 1e6:.0f} MFLOP per token at {context} cached positions; weights "
          f"{weight_bytes / 2**20:.0f} MiB fp32, KV cache {kv_bytes_per_row / 2**20:.1f} MiB per row")
    print(_common.ratio_line("tokens/s continuous (eval) / fixed batches (before)",
                             [seconds["fixed batches (before)"] / sum(map(len, results["fixed batches (before)"]))],
                             [seconds[f"continuous, batch {batch}"] / sum(map(len, results[f"continuous, batch {batch}"]))],
                             ">= 2.5"))
    first = f"continuous, batch {batch}"
    same_sizes = sum(a == b for a, b in zip(results[first], results[f"continuous, batch {2 * batch}"]))
    keys = [int(fingerprint(args.seed, e.prompt_ids), 16) for e in examples[: args.alone]]
    alone = [sample(model, [e.prompt_ids], settings, eos_token_id=eos, pad_token_id=pad, vocab_size=vocab,
                    row_keys=[key], max_length=max_length)[0] for e, key in zip(examples, keys)]
    print(f"check: continuous batch {batch} vs {2 * batch}: {same_sizes}/{len(examples)} rows identical; "
          f"sampled alone: {sum(a == b for a, b in zip(alone, results[first]))}/{len(alone)} rows identical")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common.common_arguments(parser, repeats=7)
    parser.add_argument("--batch-size", type=int, default=16, help="(--smollm2: default the recipe's, 32)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--smollm2", action="store_true", help="the eval protocol on SmolLM2-135M-Instruct")
    parser.add_argument("--prompts", type=int, default=64, help="--smollm2: Dolly test prompts (default 64)")
    parser.add_argument("--alone", type=int, default=4, help="--smollm2: rows re-sampled alone for the check")
    args = parser.parse_args()
    if args.smollm2:
        _common.setup(args.threads, args.seed)
        if args.batch_size == parser.get_default("batch_size"):
            args.batch_size = 0  # the recipe's
        if args.quick:
            args.prompts, args.alone = min(args.prompts, 12), min(args.alone, 2)
        return smollm2_comparison(args)
    if args.quick:
        args.repeats, args.max_new_tokens = min(args.repeats, 2), min(args.max_new_tokens, 32)
    _common.setup(args.threads, args.seed)

    from distillkit.config import DataConfig
    from distillkit.data.loading import load_split
    from distillkit.data.tokenization import tokenize

    print(_common.machine_note(args.threads))
    tokenizer = _common.dolly_tokenizer()
    rows = load_split(DataConfig(dataset="dolly"), "validation")
    chosen = random.Random(args.seed).sample(rows, args.batch_size)
    examples, _ = tokenize(chosen, tokenizer, max_prompt_length=128, max_length=256, long_prompts="cut_left")
    prompts = [e.prompt_ids for e in examples]
    n_new = args.max_new_tokens
    print(f"batch: {len(prompts)} Dolly validation prompts, {min(map(len, prompts))}-{max(map(len, prompts))} "
          f"tokens (left-padded to {max(map(len, prompts))}); max_new_tokens {n_new}; vocab {len(tokenizer)}; "
          f"repeats {args.repeats} (+1 warm-up)\n")

    table_rows, ratio_lines, checks = [], [], []
    for size_name, config in SIZES.items():
        model = _common.gpt2(tokenizer, **config, seed=1).eval()
        result = compare(model, prompts, tokenizer, n_new, args.repeats, args.seed)
        times, steps = result["times"], result["steps"]
        decoded = len(prompts) * n_new  # positions decoded per call, the same in every arm
        for index, name in enumerate(times):
            s = _common.Summary.of(times[name])
            label = [size_name, f"{_common.parameter_count(model) / 1e6:.1f}M"] if index == 0 else ["", ""]
            table_rows.append([*label, name, f"{s.median:.3f}", f"{s.mean:.3f} ± {s.sd:.3f}",
                               f"{decoded / s.median:,.0f}", str(steps[name])])
        generate = times["HF generate"]  # tokens/s ratio = inverse time ratio (same tokens)
        ratio_lines.append(_common.ratio_line(f"{size_name}  tokens/s distillkit sample / HF generate",
                                              generate, times["distillkit sample"], ">= 1.0"))
        ratio_lines.append(_common.ratio_line(f"{size_name}  tokens/s sample (row keys) / sample (generator)",
                                              times["distillkit sample"], times["distillkit sample (row keys)"],
                                              "~ 1.0"))
        checks.append(f"{size_name}: identical sequences in both arms: min {min(result['identical'])}/{len(prompts)} "
                      "rows per repeat; tokens through first EOS per repeat: "
                      + ", ".join(f"{n} {v}" for n, v in result["lengths"].items())
                      + "; decode steps: " + ", ".join(f"{n} {v}" for n, v in steps.items()))

    print(_common.table(["model", "params", "arm", "median s", "mean ± sd s", "tokens/s (median)", "steps"],
                        table_rows))
    print()
    for line in ratio_lines:
        print(line)
    print()
    for line in checks:
        print("check:", line)


if __name__ == "__main__":
    main()
