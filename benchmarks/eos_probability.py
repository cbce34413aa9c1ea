"""How much probability each model gives EOS where a test reference ends,
and elsewhere in the reference: a check of why on-policy students' answers
run to the sampling cap (RESULTS.md, the smollm2 bench).

    python benchmarks/eos_probability.py --model sft=FOLDER --model promptkd=FOLDER [--data dolly] [--limit 200]

Each model (a model or run folder, loaded as `distillkit eval` loads it) reads the first ``--limit`` test
prompts with their first reference, teacher-forced, tokenized with its run's lengths (as in training: the
response ends with EOS; a reference cut by ``max_length`` is left out). Printed per model, in one run:

- p(EOS) at the reference's end (where the next token is EOS): mean and median;
- the share of those ends where EOS is the model's most likely token;
- the mean p(EOS) at the reference's other positions (where stopping is wrong).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from distillkit.api import collate
from distillkit.data.loading import load_eval_set
from distillkit.data.tokenization import tokenize
from distillkit.evaluation.protocol import load_model_dir


@torch.no_grad()
def eos_probabilities(folder: Path, data: str, limit: int, batch_size: int = 8) -> dict[str, float]:
    """The summary above for the model in ``folder``."""
    model, tokenizer, recipe = load_model_dir(folder)  # in eval mode, as from_pretrained leaves it
    eos = tokenizer.eos_token_id
    examples, _ = tokenize(load_eval_set(data)[:limit], tokenizer, max_prompt_length=recipe.data.max_prompt_length,
                           max_length=recipe.data.max_length, long_prompts="cut_left")
    examples = [e for e in examples if e.response_ids and e.response_ids[-1] == eos]
    at_end, argmax_at_end, elsewhere = [], [], []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        batch = collate([e.prompt_ids for e in chunk], [e.response_ids for e in chunk], tokenizer.pad_token_id)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        for row, example in enumerate(chunk):
            first = len(example.prompt_ids) - 1  # the position whose logits predict the response's first token
            # (R, V): the distributions of the response's R tokens, the last one predicting its EOS
            probabilities = logits[row, first:first + len(example.response_ids)].float().softmax(-1)
            at_end.append(probabilities[-1, eos].item())
            argmax_at_end.append(float(probabilities[-1].argmax().item() == eos))
            elsewhere.extend(probabilities[:-1, eos].tolist())
    return {"references": len(examples), "p_eos_at_end_mean": statistics.fmean(at_end),
            "p_eos_at_end_median": statistics.median(at_end), "eos_most_likely_at_end": statistics.fmean(argmax_at_end),
            "p_eos_elsewhere_mean": statistics.fmean(elsewhere)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", required=True, help="LABEL=FOLDER (repeatable)")
    parser.add_argument("--data", default="dolly")
    parser.add_argument("--limit", type=int, default=200)
    args = parser.parse_args()
    print("| model | references | p(EOS) at the end: mean | median | EOS most likely there | p(EOS) elsewhere: mean |")
    print("|---|---|---|---|---|---|")
    for spec in args.model:
        label, _, folder = spec.partition("=")
        row = eos_probabilities(Path(folder), args.data, args.limit)
        print(f"| {label} | {row['references']} | {row['p_eos_at_end_mean']:.3g} | {row['p_eos_at_end_median']:.3g} | "
              f"{row['eos_most_likely_at_end']:.0%} | {row['p_eos_elsewhere_mean']:.3g} |", flush=True)


if __name__ == "__main__":
    main()
