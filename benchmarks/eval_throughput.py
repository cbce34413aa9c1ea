"""Tokens/s of ``distillkit.evaluation.protocol.generate`` on SmolLM2-135M-Instruct,
as ``distillkit eval`` runs it, for the code that is importable (run it with
``PYTHONPATH`` set to an installed snapshot of another commit to time that
commit's evaluation on the same prompts):

    python benchmarks/eval_throughput.py [--prompts 96] [--batch-size 32] [--threads 2]

The prompts, lengths and sampling settings are those of ``bench_sampler.py
--smollm2`` (the first N Dolly test prompts, up to 512 positions, top-k 0,
top-p 1, temperature 1, no repeated 6-grams).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    _common.setup(args.threads, args.seed)
    import torch
    from transformers import AutoModelForCausalLM

    import distillkit
    from distillkit.config import load_recipe
    from distillkit.data.loading import dataset_spec, keep_long_references, load_eval_set
    from distillkit.data.tokenization import tokenize
    from distillkit.engine.models import load_tokenizer, materialize_gguf
    from distillkit.evaluation.protocol import eval_setup, generate

    recipe = load_recipe("smollm2")
    folder = materialize_gguf(recipe.teacher.path, recipe.teacher.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(str(folder))
    setup = eval_setup(model, recipe, args.batch_size, print)
    settings = dataclasses.replace(setup.settings, max_new_tokens=0)
    rows = keep_long_references(load_eval_set("dolly", recipe.data.prompt), tokenizer,
                                dataset_spec("dolly").min_reference_tokens)[: args.prompts]
    examples, _ = tokenize(rows, tokenizer, max_prompt_length=setup.max_prompt_length, max_length=setup.max_length,
                           long_prompts="cut_left")
    started = time.perf_counter()
    outputs = generate(model, tokenizer, examples, settings, seed=args.seed, batch_size=args.batch_size,
                       max_length=setup.max_length)
    seconds = time.perf_counter() - started
    tokens = sum(map(len, outputs))
    print(f"distillkit from {Path(inspect.getfile(distillkit)).parent}: {len(examples)} prompts, batch "
          f"{args.batch_size}: {tokens:,} tokens in {seconds:.0f} s = {tokens / seconds:.1f} tokens/s")


if __name__ == "__main__":
    main()
