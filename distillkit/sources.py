"""Built-in pseudo-target sources: where the training sequences y come from.

Every source returns a right-padded ``[x ‖ y]`` batch; sampled responses come
from the one sampler (no gradients, the recipe's ``[generation]`` settings)
and keep their first EOS.
"""

from __future__ import annotations

import json
import logging

import torch

from distillkit import hookimpl
from distillkit.batch import ExampleBatch, TrainBatch, collate
from distillkit.cache import cache_root, fingerprint
from distillkit.components import PseudoTargetSource, SourceFactory
from distillkit.run import Run

log = logging.getLogger(__name__)


def _prompts(examples: ExampleBatch) -> list[list[int]]:
    return [e.prompt_ids for e in examples]


def dataset_responses(run: Run) -> PseudoTargetSource:
    """``[x ‖ y*]`` with the dataset's reference response."""
    pad_id = run.tokenizer.pad_token_id

    def make_batch(examples: ExampleBatch) -> TrainBatch:
        return collate(_prompts(examples), [e.response_ids for e in examples], pad_id)

    return make_batch


def student_samples(run: Run) -> PseudoTargetSource:
    """``[x ‖ y]`` with y ~ q_theta(.|x) sampled from the current student."""

    def make_batch(examples: ExampleBatch) -> TrainBatch:
        prompts = _prompts(examples)
        return collate(prompts, run.sample(run.student, prompts), run.tokenizer.pad_token_id)

    return make_batch


def teacher_samples(run: Run) -> PseudoTargetSource:
    """``[x ‖ y]`` with y sampled on the fly from the (adapted) teacher."""

    def make_batch(examples: ExampleBatch) -> TrainBatch:
        model, prefix = run.teacher.sampling_inputs()
        prompts = _prompts(examples)
        return collate(prompts, run.sample(model, prompts, prefix_embeds=prefix), run.tokenizer.pad_token_id)

    return make_batch


def cached_teacher_samples(run: Run, *, seed: int = 10) -> PseudoTargetSource:
    """``[x ‖ y]`` with one teacher sample per training prompt, generated once
    (seeded) and cached on disk keyed by teacher, prompts and sampler
    settings, so every SeqKD run on the same teacher reuses them."""
    prompts = [e.prompt_ids for e in run.train_examples]
    generation = run.config.recipe.generation
    key = fingerprint(run.teacher_id, prompts, generation.__dict__, run.config.recipe.data.max_length, seed)
    path = cache_root() / "teacher_generations" / f"{key}.json"
    if path.is_file():
        responses = json.loads(path.read_text())
        log.info("reusing %d cached teacher generations from %s", len(responses), path)
    else:
        model, prefix = run.teacher.sampling_inputs()
        generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        responses = [[] for _ in prompts]
        log.info("generating teacher responses for %d training prompts (cached in %s)", len(prompts), path)
        for start in range(0, len(order), generation.batch_size):
            chunk = order[start : start + generation.batch_size]
            outputs = run.sample(model, [prompts[i] for i in chunk], prefix_embeds=prefix, generator=generator)
            for index, output in zip(chunk, outputs):
                responses[index] = output
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(responses))
        tmp.rename(path)
    by_prompt = {tuple(p): r for p, r in zip(prompts, responses)}

    def make_batch(examples: ExampleBatch) -> TrainBatch:
        return collate(_prompts(examples), [by_prompt[tuple(e.prompt_ids)] for e in examples],
                       run.tokenizer.pad_token_id)

    return make_batch


def mixture(run: Run, *, fraction: float = 0.5, schedule: str = "constant") -> PseudoTargetSource:
    """Per micro-batch coin flip (GKD): student samples with probability
    ``fraction * schedule(k, K)``, otherwise the dataset responses."""
    on_policy, off_policy = student_samples(run), dataset_responses(run)

    def make_batch(examples: ExampleBatch) -> TrainBatch:
        probability = fraction * run.schedule(schedule)
        use_student = bool(torch.rand(()) < probability)
        return (on_policy if use_student else off_policy)(examples)

    return make_batch


@hookimpl
def distillkit_register_sources() -> list[SourceFactory]:
    return [
        SourceFactory("dataset", "the dataset's reference responses", dataset_responses),
        SourceFactory("student", "fresh samples from the current student", student_samples),
        SourceFactory("teacher", "samples from the (adapted) teacher, on the fly", teacher_samples),
        SourceFactory("teacher_cache", "one teacher sample per prompt, generated once and cached", cached_teacher_samples),
        SourceFactory("mixture", "student samples with probability lambda, else dataset responses", mixture),
    ]
