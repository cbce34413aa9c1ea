"""ROUGE-L evaluation as in the PromptKD / MiniLLM protocol: sample one
response per prompt for each seed, score ROUGE-L F1 (rouge-score, stemming,
max over references) x 100, average over examples, then over seeds."""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rouge_score import rouge_scorer

from distillkit.batch import TokenizedExample
from distillkit.errors import DistillkitError
from distillkit.sampling import SamplingSettings, sample, settings_from

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


def _run_settings(model_dir: Path) -> dict[str, Any]:
    """The recipe of the run that produced the model, from the ``run.json``
    next to it (else the defaults: the paper's lengths and sampling)."""
    for folder in (model_dir, model_dir.parent):
        manifest = folder / "run.json"
        if manifest.is_file():
            return json.loads(manifest.read_text())["recipe"]
    return {}


def load_model_dir(model_dir: Path) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """The model (on the GPU when there is one), tokenizer and recipe (from
    ``run.json``, else {}) in a model folder, or in a run folder's ``best/``;
    ``model.name_or_path`` is the folder read."""
    from transformers import AutoModelForCausalLM

    from distillkit.models import load_tokenizer

    if (model_dir / "best").is_dir():
        model_dir = model_dir / "best"
    if not (model_dir / "config.json").is_file():
        raise DistillkitError(f"{model_dir} holds no model (config.json missing); pass a model or run folder")
    tokenizer = load_tokenizer(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    return model, tokenizer, _run_settings(model_dir)


def evaluate_model_dir(
    model_dir: Path,
    data: str,
    *,
    seeds: list[int],
    limit: int = 0,
    batch_size: int = 0,
    progress: Callable[[int, int], None] | None = None,
    notice: Callable[[str], None] = print,
) -> dict[str, Any]:
    """``distillkit eval``: ROUGE-L of a saved model (or a run's best
    checkpoint) on a registered dataset's test split or a data file, with the
    lengths and sampling settings of the run that produced it.  Returns a
    JSON-ready report (per-seed scores, mean, std, generated tokens)."""
    from distillkit.config import DataConfig, EvalConfig, GenerationConfig, build
    from distillkit.data import load_eval_set, tokenize
    from distillkit.models import max_positions

    model, tokenizer, recipe = load_model_dir(model_dir)
    data_cfg = build(DataConfig, recipe.get("data", {}), "data")
    generation = build(GenerationConfig, recipe.get("generation", {}), "generation")
    eval_cfg = build(EvalConfig, recipe.get("eval", {}), "eval")
    positions = max_positions(model)
    if positions is not None and positions < data_cfg.max_length:
        notice(f"note: the model takes {positions} positions; max_length {data_cfg.max_length} -> {positions}")
        data_cfg.max_length = positions
        data_cfg.max_prompt_length = min(data_cfg.max_prompt_length, positions // 2)
    examples = load_eval_set(data)[: limit or None]
    tokenized, _ = tokenize(examples, tokenizer, max_prompt_length=data_cfg.max_prompt_length,
                            max_length=data_cfg.max_length, training=False)
    total = len(tokenized) * len(seeds)
    result = evaluate(model, tokenizer, tokenized, settings_from(generation, no_repeat_ngram_size=eval_cfg.no_repeat_ngram_size),
                      seeds=seeds, batch_size=batch_size or generation.batch_size, max_length=data_cfg.max_length,
                      progress=None if progress is None else (lambda n: progress(n, total)))
    return {"model": model.name_or_path, "data": data, "examples": len(tokenized),
            "rougeL": {str(k): v for k, v in result.per_seed.items()}, "mean": result.mean, "std": result.std,
            "generated_tokens": result.generated_tokens}
