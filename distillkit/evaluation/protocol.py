"""ROUGE-L evaluation as in the PromptKD / MiniLLM protocol: sample one
response per prompt for each seed, score ROUGE-L F1 (rouge-score, stemming,
max over references) x 100, average over examples, then over seeds.

:func:`evaluate_sets` runs that protocol on several test sets with one loaded
model and caches each (set, seed) cell, so a rerun computes only the missing
cells.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import re
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rouge_score import rouge_scorer

from distillkit.api import TokenizedExample
from distillkit.config import GenerationConfig, Recipe
from distillkit.config.run_folder import BEST, RECORD_FILES, recipe_of_model
from distillkit.config.schema import PromptSource
from distillkit.engine.sampling import NOISE
from distillkit.errors import DatasetUnavailable, DistillkitError
from distillkit.files import cache_root, files_fingerprint, fingerprint, write_json_atomic
from distillkit.registry import registry

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
    settings: GenerationConfig,
    *,
    seed: int,
    batch_size: int,
    max_length: int,
    progress: Callable[[int], None] | None = None,
) -> list[list[int]]:
    """Sample a response for each example (in input order), up to
    ``max_length`` tokens with its prompt (``max_new_tokens = 0``: that alone).

    Each prompt's noise is keyed by ``seed``, the prompt and how often the
    same prompt came before it in ``examples``, so a response depends on
    neither the batching nor how the examples are split over processes; the
    sampler then batches continuously, ``batch_size`` rows at a time, the
    prompts ordered by length (less padding).  ``progress(n)``: n more
    responses ended."""
    seen: collections.Counter[tuple[int, ...]] = collections.Counter()
    keys = []
    for example in examples:
        prompt = tuple(example.prompt_ids)
        repeat = seen[prompt]
        seen[prompt] += 1
        keys.append(int(fingerprint(seed, example.prompt_ids, *([repeat] if repeat else [])), 16))
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].prompt_ids))
    outputs = registry().generation_backends[settings.backend].sample(
        model, [examples[i].prompt_ids for i in order], settings, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, vocab_size=len(tokenizer), row_keys=[keys[i] for i in order],
        max_length=max_length, batch_size=batch_size, progress=progress)
    responses: list[list[int]] = [[] for _ in examples]
    for index, output in zip(order, outputs):
        responses[index] = output
    return responses


def evaluate(
    model: torch.nn.Module,
    tokenizer: Any,
    examples: list[TokenizedExample],
    settings: GenerationConfig,
    *,
    seeds: list[int],
    batch_size: int,
    max_length: int,
    progress: Callable[[int], None] | None = None,
) -> EvalResult:
    """Mean ROUGE-L of sampled responses (see :func:`generate`), one value per seed."""
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


def model_folder(model_dir: Path) -> Path:
    """The model folder itself, or a run folder's ``best/``."""
    if (model_dir / BEST).is_dir():
        model_dir = model_dir / BEST
    if not (model_dir / "config.json").is_file():
        raise DistillkitError(f"{model_dir} holds no model (config.json missing); pass a model or run folder")
    return model_dir


def load_model_dir(model_dir: Path, recipe: Recipe | None = None) -> tuple[torch.nn.Module, Any, Recipe]:
    """The model (on the GPU when there is one), tokenizer and ``recipe``,
    by default the recipe of the run that produced it (see
    :func:`~distillkit.config.run_folder.recipe_of_model`), in a model
    folder, or in a run folder's ``best/``; ``model.name_or_path`` is the
    folder read."""
    from transformers import AutoModelForCausalLM

    from distillkit.engine.models import load_tokenizer

    model_dir = model_folder(model_dir)
    tokenizer = load_tokenizer(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.to(eval_device())
    return model, tokenizer, recipe or recipe_of_model(model_dir)


def recipe_seeds(model_dir: Path) -> list[int]:
    """The evaluation seeds of the run that produced the model (the paper's
    10, 20, 30, 40, 50 unless its recipe says otherwise)."""
    return list(recipe_of_model(model_folder(model_dir)).eval.seeds)


@dataclass(frozen=True)
class EvalSetup:
    """How a model is evaluated: prompt and total lengths (tokens), sampling
    settings and prompts per generation batch."""

    max_prompt_length: int
    max_length: int
    settings: GenerationConfig
    batch_size: int


def eval_sampling(recipe: Recipe) -> GenerationConfig:
    """The sampling settings of the recipe's final evaluation: ``[generation]``'s
    with ``[eval]``'s ``max_new_tokens`` and ``no_repeat_ngram_size``."""
    return recipe.generation.with_overrides(max_new_tokens=recipe.eval.max_new_tokens,
                                            no_repeat_ngram_size=recipe.eval.no_repeat_ngram_size)


def validation_sampling(recipe: Recipe) -> GenerationConfig:
    """The sampling settings of validation during training: ``[generation]``'s
    with ``[eval]``'s ``max_new_tokens``."""
    return recipe.generation.with_overrides(max_new_tokens=recipe.eval.max_new_tokens)


def eval_device() -> str:
    """Where a model is evaluated: the GPU when there is one."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def eval_setup(model: torch.nn.Module, recipe: Recipe, batch_size: int,
               notice: Callable[[str], None]) -> EvalSetup:
    """The lengths and sampling of the run's recipe (``batch_size`` 0: the
    recipe's), with lengths cut to the positions the model takes."""
    from distillkit.engine.models import max_positions

    max_prompt_length, max_length = recipe.data.max_prompt_length, recipe.data.max_length
    positions = max_positions(model)
    if positions is not None and positions < max_length:
        notice(f"note: the model takes {positions} positions; max_length {max_length} -> {positions}")
        max_prompt_length, max_length = min(max_prompt_length, positions // 2), positions
    return EvalSetup(max_prompt_length, max_length, eval_sampling(recipe), batch_size or recipe.generation.batch_size)


# --- test sets and the result cache -----------------------------------------------


SUBSET_SEED = 0  # the seed of every reduced protocol's subsets: the same examples on every machine


def seeded_subset(examples: list[Any], size: int) -> list[Any]:
    """``size`` of ``examples`` drawn at random with :data:`SUBSET_SEED`, in
    their original order (all of them when ``size`` is 0 or not smaller).
    The draw ranks positions by a hash, so it depends on nothing but the
    seed and the set's length: not on the Python or torch version."""
    if not size or size >= len(examples):
        return examples
    ranked = sorted(range(len(examples)), key=lambda index: fingerprint(SUBSET_SEED, index))
    return [examples[index] for index in sorted(ranked[:size])]


def check_subsets(subsets: dict[str, int], sets: list[str]) -> None:
    """Raise for a requested subset (set name -> size) of a set that is not
    evaluated or of a size below 1: the commands' check of ``--subset``,
    before any work (:func:`evaluate_sets` takes size 0 as the whole set)."""
    for name, size in subsets.items():
        if name not in sets:
            raise DistillkitError(f"--subset {name}={size} names a set that is not evaluated; "
                                  f"evaluated: {', '.join(sets)}")
        if size < 1:
            raise DistillkitError(f"--subset {name}={size}: the size must be >= 1 (leave it out to evaluate "
                                  "the whole set)")


def load_test_set(name: str, tokenizer: Any, setup: EvalSetup, *, prompt: PromptSource, limit: int,
                  notice: Callable[[str], None], subset: int = 0) -> tuple[list[TokenizedExample], dict[str, Any]]:
    """A test set loaded, filtered (the dataset's reference length), reduced
    to a seeded random ``subset`` of that many examples (0: all; see
    :func:`seeded_subset`), cut to its first ``limit`` examples (0: all) and
    tokenized with prompts cut to ``setup``'s lengths; with the record of the
    reference filter, if any (``{"reference_filter": ...}``), and of the
    subset (``{"subset": {"size", "of", "seed"}}``).  Raises
    :class:`~distillkit.errors.DatasetUnavailable` for a dataset whose files
    are absent for a known reason."""
    from distillkit.data.loading import dataset_spec, keep_long_references, load_eval_set
    from distillkit.data.tokenization import tokenize

    rows = load_eval_set(name, prompt)
    spec = dataset_spec(name)
    minimum = spec.min_reference_tokens if spec is not None else 0
    kept = keep_long_references(rows, tokenizer, minimum)
    examples = seeded_subset(kept, subset)[: limit or None]
    extra: dict[str, Any] = {}
    if subset:
        extra["subset"] = {"size": subset, "of": len(kept), "seed": SUBSET_SEED}
    if minimum:
        extra["reference_filter"] = {"min_tokens": minimum, "counted_with": str(tokenizer.name_or_path),
                                     "kept": len(kept), "rows": len(rows)}
        notice(f"{name}: {len(kept)} of {len(rows)} examples have a reference of >= {minimum} tokens "
               "(counted with the model's tokenizer)")
    if not examples:
        raise DistillkitError(f"test set '{name}' has no examples to evaluate")
    tokenized, _ = tokenize(examples, tokenizer, max_prompt_length=setup.max_prompt_length,
                            max_length=setup.max_length, long_prompts="cut_left")
    return tokenized, extra


@dataclass
class _SetRun:
    """One test set of an :func:`evaluate_sets` call: its tokenized examples,
    the cache file of each seed, and the cells (per-seed records) known so far."""

    name: str
    examples: list[TokenizedExample]
    files: dict[int, Path]
    cells: dict[int, dict[str, Any]]
    extra: dict[str, Any]
    limit: int


def _cell(path: Path) -> dict[str, Any] | None:
    """A cached cell, or None when absent or unreadable (then recomputed)."""
    try:
        cell = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return cell if isinstance(cell, dict) and {"rougeL", "generated_tokens"} <= cell.keys() else None


def _prepare_set(name: str, model: torch.nn.Module, tokenizer: Any, setup: EvalSetup, *, prompt: PromptSource,
                 seeds: list[int], limit: int, subset: int, weights: str, notice: Callable[[str], None]) -> _SetRun:
    """Load, filter, cut and tokenize a test set (prompts as ``prompt``, the
    run's ``data.prompt``, asks), and read its cached cells.

    The cache lives under ``cache_root()/eval/<weights>/`` rather than in the
    model folder: the key is a content hash of the model files (not of its
    records, :data:`~distillkit.config.run_folder.RECORD_FILES`: its card and
    ``best.json``, which holds a wall time), so a copied, moved or exported
    model reuses its scores, read-only model folders work, and run
    folders stay as training wrote them.  A cell's key also covers the
    examples (token ids and references, so data, template, filter, subset and limit),
    the seed, lengths, sampling settings and device type (not the batch
    size: the samples do not depend on it, see :func:`generate`)."""
    tokenized, extra = load_test_set(name, tokenizer, setup, prompt=prompt, limit=limit, subset=subset,
                                     notice=notice)
    content = fingerprint([(t.prompt_ids, t.example.references) for t in tokenized])
    folder = cache_root() / "eval" / weights / re.sub(r"[^\w.-]+", "_", name).strip("_")
    shape = {k: v for k, v in dataclasses.asdict(setup).items() if k != "batch_size"}
    key = (name, content, {**shape, "settings": sampling_identity(setup.settings)}, limit,
           next(model.parameters()).device.type, *([subset] if subset else []))
    files = {seed: folder / f"seed{seed}-{fingerprint(*key, seed)}.json" for seed in seeds}
    cells = {seed: cell for seed, path in files.items() if (cell := _cell(path)) is not None}
    return _SetRun(name, tokenized, files, cells, extra, limit)


def sampling_identity(settings: GenerationConfig) -> dict[str, Any]:
    """The sampling settings in an eval cell's key: what decides the samples
    (not ``batch_size``: with row-keyed noise the samples do not depend on it)."""
    return {"noise": NOISE, **{k: v for k, v in dataclasses.asdict(settings).items() if k != "batch_size"}}


REPORTED_SAMPLES = 3  # a report shows the responses to a set's first 3 examples


def _report(run: _SetRun, model_dir: Path, seeds: list[int]) -> dict[str, Any]:
    result = EvalResult({seed: run.cells[seed]["rougeL"] for seed in seeds},
                        sum(run.cells[seed]["generated_tokens"] for seed in seeds))
    samples = [{"instruction": tokenized.example.instruction, "input": tokenized.example.input,
                "references": list(tokenized.example.references),
                "responses": {str(seed): run.cells[seed]["samples"][index] for seed in seeds}}
               for index, tokenized in enumerate(run.examples[:REPORTED_SAMPLES])]
    return {"model": str(model_dir), "data": run.name, "examples": len(run.examples), "limit": run.limit,
            "rougeL": {str(k): v for k, v in result.per_seed.items()}, "mean": result.mean, "std": result.std,
            "generated_tokens": result.generated_tokens, **run.extra, "samples": samples}


def evaluate_sets(
    model_dir: Path,
    sets: list[str],
    *,
    seeds: list[int],
    limit: int = 0,
    subsets: dict[str, int] | None = None,
    batch_size: int = 0,
    progress: Callable[[int, int], None] | None = None,
    notice: Callable[[str], None] = print,
    recipe: Recipe | None = None,
) -> dict[str, dict]:
    """ROUGE-L of a saved model (or a run's best checkpoint) on each test set
    (registered dataset names, whose test split is used, or data files), with
    the lengths and sampling settings of the run that produced it.  The model
    is loaded once; each (set, seed) cell is cached (see :func:`_prepare_set`),
    so only missing cells are generated.  ``progress(done, total)`` counts
    generated responses.  Returns per set a JSON-ready report (model, data,
    examples, limit, rougeL per seed, mean, std, generated_tokens over all
    seeds, ``reference_filter`` for a length-filtered set, ``subset`` for a
    set named in ``subsets`` (set name -> the size of its seeded random
    subset, see :func:`seeded_subset`), and ``samples``: the
    first :data:`REPORTED_SAMPLES` examples with their responses per seed), or
    ``{"missing": reason}`` for a dataset whose files are absent for a known
    reason (``missing_reason``, e.g. UnNI).  ``recipe``: the lengths, prompt
    template and sampling settings to use instead of those of the run that
    produced the model (:func:`load_model_dir`)."""
    model, tokenizer, recipe = load_model_dir(model_dir, recipe)
    folder = Path(model.name_or_path)
    setup = eval_setup(model, recipe, batch_size, notice)
    weights = files_fingerprint([p for p in folder.iterdir() if p.is_file() and p.name not in RECORD_FILES])
    reports: dict[str, dict] = {}
    runs = []
    for name in dict.fromkeys(sets):
        try:
            runs.append(_prepare_set(name, model, tokenizer, setup, prompt=recipe.data.prompt, seeds=seeds,
                                     limit=limit, subset=(subsets or {}).get(name, 0), weights=weights,
                                     notice=notice))
        except DatasetUnavailable as missing:
            reports[name] = {"missing": missing.reason}
    todo = [(run, seed) for run in runs for seed in seeds if seed not in run.cells]
    total, done = sum(len(run.examples) for run, _ in todo), 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, total)

    for run, seed in todo:
        result = evaluate(model, tokenizer, run.examples, setup.settings, seeds=[seed], batch_size=setup.batch_size,
                          max_length=setup.max_length, progress=advance)
        run.cells[seed] = {"set": run.name, "seed": seed, "model": str(folder), "weights": weights, "limit": limit,
                           "examples": len(run.examples), "rougeL": result.per_seed[seed],
                           "generated_tokens": result.generated_tokens, "setup": dataclasses.asdict(setup),
                           "samples": result.samples[seed]}
        write_json_atomic(run.files[seed], run.cells[seed])
    reports.update({run.name: _report(run, folder, seeds) for run in runs})
    return {name: reports[name] for name in dict.fromkeys(sets)}


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
    """:func:`evaluate_sets` on one test set; a set whose data is not
    available is an error."""
    report = evaluate_sets(model_dir, [data], seeds=seeds, limit=limit, batch_size=batch_size, progress=progress,
                           notice=notice)[data]
    if "missing" in report:
        raise DistillkitError(f"dataset '{data}' is not available: {report['missing']}")
    return report
