"""Built-in pseudo-target sources: where the training sequences y come from.

Every source returns a right-padded ``[x ‖ y]`` batch; sampled responses come
from the one sampler (no gradients, the recipe's ``[generation]`` settings)
and keep their first EOS.  Each declares its options (a dataclass, checked
when the recipe loads) and, for the memory planner, the models it samples
from.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch

from distillkit.api import (
    CappedEnding,
    DistillkitError,
    ExampleBatch,
    PairedBatch,
    PlanContext,
    PseudoTargetSource,
    ScheduleName,
    SourceFactory,
    SourceFootprint,
    StepContext,
    TrainBatch,
    cache_root,
    collate,
    ended_with_eos,
    fingerprint,
    hookimpl,
    keyed_generator,
    require,
    write_json_atomic,
)
from distillkit.engine.sampling import NOISE

if TYPE_CHECKING:
    from distillkit.config.assembly import RunConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SampledOptions:
    """Options of a source that samples on the fly.  ``plain_sampling``: the
    method's loss reads the samples' log-probabilities under the unfiltered
    model (an on-policy estimate), so ``[generation]`` must not filter."""

    capped_ending: CappedEnding = "open"  # a sample cut at its length limit: see distillkit.engine.sampling.sample
    plain_sampling: bool = False


def check_sampled(config: RunConfig, options: SampledOptions) -> None:
    """With ``plain_sampling``, the recipe samples from the model's own distribution."""
    fixes = config.recipe.generation.plain_sampling_fixes() if options.plain_sampling else []
    if fixes:
        raise DistillkitError(f"{config.method} needs plain sampling (its loss reads the samples' log-probabilities "
                              f"under the unfiltered student): set {', '.join(fixes)}")


@dataclass(frozen=True)
class TeacherCacheOptions:
    """``seed`` keys the generation; ``targets``: the samples' text
    re-tokenized (``"text"``) or their token ids (``"ids"``, ended as
    ``capped_ending`` says)."""

    seed: int = 10
    targets: Literal["text", "ids"] = "text"
    capped_ending: CappedEnding = "open"


@dataclass(frozen=True)
class MixtureOptions:
    """Student samples with probability ``fraction * schedule(k, K)``."""

    fraction: float = 0.5
    schedule: ScheduleName = "constant"
    capped_ending: CappedEnding = "open"

    def __post_init__(self) -> None:
        require(0 <= self.fraction <= 1, "fraction", "be in [0, 1]", self.fraction)


def _prompts(examples: ExampleBatch) -> list[list[int]]:
    return [e.prompt_ids for e in examples]


def dataset_responses(run: StepContext) -> PseudoTargetSource:
    """``[x ‖ y*]`` with the dataset's reference response."""
    pad_id = run.tokenizer.pad_token_id

    def make_batch(examples: ExampleBatch) -> TrainBatch:
        return collate(_prompts(examples), [e.response_ids for e in examples], pad_id)

    return make_batch


def student_samples(run: StepContext, **options: Any) -> PseudoTargetSource:
    """``[x ‖ y]`` with y ~ q_theta(.|x) sampled from the current student
    (``options``: :class:`SampledOptions`)."""
    capped_ending = SampledOptions(**options).capped_ending

    def make_batch(examples: ExampleBatch) -> TrainBatch:
        prompts = _prompts(examples)
        responses = run.sample(run.student, prompts, capped_ending=capped_ending)
        return collate(prompts, responses, run.tokenizer.pad_token_id)

    return make_batch


def teacher_samples(run: StepContext, **options: Any) -> PseudoTargetSource:
    """``[x ‖ y]`` with y sampled on the fly from the (adapted) teacher
    (``options``: :class:`SampledOptions`)."""
    capped_ending = SampledOptions(**options).capped_ending

    def make_batch(examples: ExampleBatch) -> TrainBatch:
        model, prefix = run.teacher.sampling_inputs()
        prompts = _prompts(examples)
        responses = run.sample(model, prompts, prefix_embeds=prefix, capped_ending=capped_ending)
        return collate(prompts, responses, run.tokenizer.pad_token_id)

    return make_batch


def retokenized(run: StepContext, examples: ExampleBatch, responses: list[list[int]]) -> list[list[int]]:
    """``responses`` (token ids) decoded to text without special tokens and
    tokenized again as dataset responses (:meth:`StepContext.tokenize_responses`),
    as SeqKD's reference builds its targets: generate.py decodes with
    ``skip_special_tokens=True`` and tools/process_data_dolly.py re-tokenizes
    the text (gmkim-ai/PromptKD, ``scripts/gpt2/tools/process_pseudo_data_seqkd.sh``)."""
    return run.tokenize_responses(examples, run.tokenizer.batch_decode(responses, skip_special_tokens=True))


def cached_teacher_samples(run: StepContext, **options: Any) -> PseudoTargetSource:
    """``[x ‖ y]`` with one teacher sample per training prompt, generated once
    (seeded) and cached on disk keyed by teacher, prompts and sampler
    settings, so every SeqKD run on the same teacher reuses them.

    ``options`` (:class:`TeacherCacheOptions`): ``targets = "text"`` (the
    reference) trains on the samples' text re-tokenized as dataset responses
    (:func:`retokenized`: every target ends with EOS); ``"ids"`` on the
    sampled token ids, ended as ``capped_ending`` says."""
    opts = TeacherCacheOptions(**options)
    prompts = [e.prompt_ids for e in run.train_examples]
    generation = run.config.recipe.generation
    key = fingerprint(run.teacher_id, prompts, generation.identity(), run.config.recipe.data.max_length, opts.seed,
                      NOISE)
    path = cache_root() / "teacher_generations" / f"{key}.json"
    if path.is_file():
        responses = json.loads(path.read_text())
        log.info("reusing %d cached teacher generations from %s", len(responses), path)
    else:
        responses = _generate_shared(run, prompts, generation.batch_size, opts.seed)
        if run.process_index == 0:
            write_json_atomic(path, responses)
    if opts.targets == "text":
        responses = retokenized(run, run.train_examples, responses)
    elif opts.capped_ending == "eos":
        responses = [ended_with_eos(r, run.tokenizer.eos_token_id) for r in responses]
    by_prompt = {tuple(p): r for p, r in zip(prompts, responses)}

    def make_batch(examples: ExampleBatch) -> TrainBatch:
        return collate(_prompts(examples), [by_prompt[tuple(e.prompt_ids)] for e in examples],
                       run.tokenizer.pad_token_id)

    return make_batch


def teacher_student_pairs(run: StepContext, **options: Any) -> PseudoTargetSource:
    """Per prompt, the cached teacher sample (:func:`cached_teacher_samples`,
    ``options``: :class:`TeacherCacheOptions`, the same cache) and a fresh
    student sample (:func:`student_samples`) as a :class:`PairedBatch`:
    the teacher view first, the student view ``paired``."""
    opts = TeacherCacheOptions(**options)
    teacher = cached_teacher_samples(run, seed=opts.seed, targets=opts.targets, capped_ending=opts.capped_ending)
    student = student_samples(run, capped_ending=opts.capped_ending)

    def make_batch(examples: ExampleBatch) -> PairedBatch:
        view = teacher(examples)
        return PairedBatch(view.input_ids, view.attention_mask, view.response_mask, student(examples))

    return make_batch


def _generate_shared(run: StepContext, prompts: list[list[int]], batch_size: int, seed: int) -> list[list[int]]:
    """One teacher sample per prompt (keyed by ``seed``, so the result does
    not depend on the layout), each process generating its share; every
    process returns all of them."""
    model, prefix = run.teacher.sampling_inputs()
    mine = sorted(range(run.process_index, len(prompts), run.num_processes), key=lambda i: len(prompts[i]))
    # every process runs the same number of sampler calls (a sharded teacher needs all of them)
    calls = math.ceil(math.ceil(len(prompts) / run.num_processes) / batch_size)
    log.info("generating teacher responses for %d training prompts", len(prompts))
    generated = {}
    for call in range(calls):
        chunk = mine[call * batch_size : (call + 1) * batch_size] or mine[:1]
        outputs = run.sample(model, [prompts[i] for i in chunk], prefix_embeds=prefix, key=("teacher_cache", seed))
        generated.update(zip(chunk, outputs))
    if run.num_processes > 1:
        from accelerate.utils import gather_object

        generated = dict(gather_object(list(generated.items())))
    return [generated[i] for i in range(len(prompts))]


def mixture(run: StepContext, **options: Any) -> PseudoTargetSource:
    """A coin flip per optimizer step (GKD): student samples with probability
    ``fraction * schedule(k, K)``, otherwise the dataset responses
    (``options``: :class:`MixtureOptions`)."""
    opts = MixtureOptions(**options)
    on_policy, off_policy = student_samples(run, capped_ending=opts.capped_ending), dataset_responses(run)

    def make_batch(examples: ExampleBatch) -> TrainBatch:
        probability = opts.fraction * run.schedule(opts.schedule)
        coin = torch.rand((), generator=keyed_generator(run.config.training.seed, "mixture", run.step))
        use_student = bool(coin < probability)  # one coin per optimizer step, the same in every process
        return (on_policy if use_student else off_policy)(examples)

    return make_batch


# --- memory footprints ------------------------------------------------------------


def student_sampling(plan: PlanContext, options: Any) -> SourceFootprint:
    """The student samples each micro-batch (its KV cache)."""
    return SourceFootprint(samples_from=("student",), batch=plan.micro_batch)


def teacher_sampling(plan: PlanContext, options: Any) -> SourceFootprint:
    """The teacher samples each micro-batch (its KV cache)."""
    return SourceFootprint(samples_from=("teacher",), batch=plan.micro_batch)


def cached_teacher_sampling(plan: PlanContext, options: Any) -> SourceFootprint:
    """The teacher samples once before training, ``generation.batch_size`` prompts per call."""
    return SourceFootprint(samples_from=("teacher",), batch=plan.config.recipe.generation.batch_size)


def teacher_student_sampling(plan: PlanContext, options: Any) -> SourceFootprint:
    """The teacher samples once before training (``generation.batch_size``
    prompts per call), the student every micro-batch: both declared at the
    larger of the two batches (an upper bound)."""
    return SourceFootprint(samples_from=("teacher", "student"),
                           batch=max(plan.config.recipe.generation.batch_size, plan.micro_batch))


@hookimpl
def distillkit_register_sources() -> list[SourceFactory]:
    return [
        SourceFactory("dataset", "the dataset's reference responses", dataset_responses,
                      fixed_view=dataset_responses),
        SourceFactory("student", "fresh samples from the current student", student_samples, options=SampledOptions,
                      check=check_sampled, footprint=student_sampling),
        SourceFactory("teacher", "samples from the (adapted) teacher, on the fly", teacher_samples,
                      options=SampledOptions, check=check_sampled, footprint=teacher_sampling),
        SourceFactory("teacher_cache", "one teacher sample per prompt, generated once and cached",
                      cached_teacher_samples, options=TeacherCacheOptions, footprint=cached_teacher_sampling,
                      fixed_view=cached_teacher_samples),
        SourceFactory("teacher_student", "per prompt, the cached teacher sample paired with a fresh student sample",
                      teacher_student_pairs, options=TeacherCacheOptions, footprint=teacher_student_sampling,
                      fixed_view=cached_teacher_samples),
        SourceFactory("mixture", "student samples with probability lambda, else dataset responses", mixture,
                      options=MixtureOptions, footprint=student_sampling),
    ]
