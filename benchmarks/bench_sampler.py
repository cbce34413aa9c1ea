"""Throughput of distillkit's sampler against 🤗 ``generate``, side by side.

    python benchmarks/bench_sampler.py [--repeats N] [--quick]

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
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common.common_arguments(parser, repeats=7)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()
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
