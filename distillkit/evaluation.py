"""ROUGE-L evaluation as in the PromptKD / MiniLLM protocol: sample one
response per prompt for each seed, score ROUGE-L F1 (rouge-score, stemming,
max over references) x 100, average over examples, then over seeds."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from rouge_score import rouge_scorer

from distillkit.batch import TokenizedExample
from distillkit.sampling import SamplingSettings, sample

_SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, references: tuple[str, ...] | list[str]) -> float:
    """ROUGE-L F1 x 100 of ``prediction`` against its best reference."""
    return 100.0 * max(_SCORER.score(ref, prediction)["rougeL"].fmeasure for ref in references)


@dataclass
class EvalResult:
    """ROUGE-L per seed, with mean and (sample) standard deviation over seeds."""

    per_seed: dict[int, float]
    generated_tokens: int = 0
    samples: dict[int, list[str]] = field(default_factory=dict, repr=False)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.per_seed.values())

    @property
    def std(self) -> float:
        return statistics.stdev(self.per_seed.values()) if len(self.per_seed) > 1 else 0.0


def generate(
    model: torch.nn.Module,
    tokenizer: Any,
    examples: list[TokenizedExample],
    settings: SamplingSettings,
    *,
    seed: int,
    batch_size: int,
    max_length: int,
    progress: Callable[[int], None] | None = None,
) -> list[list[int]]:
    """Sample a response for each example (in input order).  Batches group
    prompts of similar length; ``max_new_tokens = 0`` fills up to ``max_length``."""
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].prompt_ids))
    responses: list[list[int]] = [[] for _ in examples]
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        prompts = [examples[i].prompt_ids for i in chunk]
        outputs = sample(model, prompts, settings.within(prompts, max_length), eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, vocab_size=len(tokenizer), generator=generator)
        for index, output in zip(chunk, outputs):
            responses[index] = output
        if progress is not None:
            progress(len(chunk))
    return responses


def evaluate(
    model: torch.nn.Module,
    tokenizer: Any,
    examples: list[TokenizedExample],
    settings: SamplingSettings,
    *,
    seeds: list[int],
    batch_size: int,
    max_length: int,
    progress: Callable[[int], None] | None = None,
) -> EvalResult:
    """Mean ROUGE-L of sampled responses, one value per seed."""
    result = EvalResult(per_seed={})
    for seed in seeds:
        outputs = generate(model, tokenizer, examples, settings, seed=seed, batch_size=batch_size,
                           max_length=max_length, progress=progress)
        texts = tokenizer.batch_decode(outputs, skip_special_tokens=True)
        scores = [rouge_l(text.strip(), ex.example.references) for text, ex in zip(texts, examples)]
        result.per_seed[seed] = statistics.fmean(scores) if scores else 0.0
        result.generated_tokens += sum(len(o) for o in outputs)
        result.samples[seed] = texts
    return result
