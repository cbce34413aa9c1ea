"""Built-in pseudo-target sources: where the training sequences y come from.

Every source returns a right-padded ``[x ‖ y]`` batch; sampled responses come
from the one sampler (no gradients, the recipe's ``[generation]`` settings)
and keep their first EOS.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from typing import Any, Literal

import torch

from distillkit import hookimpl
from distillkit.batch import ExampleBatch, RolloutBatch, TrainBatch, collate
from distillkit.cache import cache_root, fingerprint, write_json_atomic
from distillkit.components import PseudoTargetSource, SourceFactory
from distillkit.data import tokenize
from distillkit.divergences import masked_token_logprobs
from distillkit.errors import DistillkitError
from distillkit.run import Run
from distillkit.sampling import CappedEnding, ended_with_eos

log = logging.getLogger(__name__)


def _prompts(examples: ExampleBatch) -> list[list[int]]:
    return [e.prompt_ids for e in examples]


def dataset_responses(run: Run) -> PseudoTargetSource:
    """``[x ‖ y*]`` with the dataset's reference response."""
    pad_id = run.tokenizer.pad_token_id

    def make_batch(examples: ExampleBatch) -> TrainBatch:
        return collate(_prompts(examples), [e.response_ids for e in examples], pad_id)

    return make_batch


def student_samples(run: Run, *, capped_ending: CappedEnding = "open") -> PseudoTargetSource:
    """``[x ‖ y]`` with y ~ q_theta(.|x) sampled from the current student;
    ``capped_ending``: see :func:`distillkit.sampling.sample`."""

    def make_batch(examples: ExampleBatch) -> TrainBatch:
        prompts = _prompts(examples)
        responses = run.sample(run.student, prompts, capped_ending=capped_ending)
        return collate(prompts, responses, run.tokenizer.pad_token_id)

    return make_batch


def teacher_samples(run: Run, *, capped_ending: CappedEnding = "open") -> PseudoTargetSource:
    """``[x ‖ y]`` with y sampled on the fly from the (adapted) teacher."""

    def make_batch(examples: ExampleBatch) -> TrainBatch:
        model, prefix = run.teacher.sampling_inputs()
        prompts = _prompts(examples)
        responses = run.sample(model, prompts, prefix_embeds=prefix, capped_ending=capped_ending)
        return collate(prompts, responses, run.tokenizer.pad_token_id)

    return make_batch


def retokenized(run: Run, examples: ExampleBatch, responses: list[list[int]]) -> list[list[int]]:
    """``responses`` (token ids) decoded to text without special tokens and
    tokenized again as dataset responses (joint with the prompt, EOS
    appended, cut to ``data.max_length``), as SeqKD's reference builds its
    targets: generate.py decodes with ``skip_special_tokens=True`` and
    tools/process_data_dolly.py re-tokenizes the text (gmkim-ai/PromptKD,
    ``scripts/gpt2/tools/process_pseudo_data_seqkd.sh``)."""
    texts = run.tokenizer.batch_decode(responses, skip_special_tokens=True)
    generated = [dataclasses.replace(e.example, references=(text,)) for e, text in zip(examples, texts)]
    max_length = run.config.recipe.data.max_length
    # training=False drops no example, so the results stay aligned with ``examples``
    tokenized, _ = tokenize(generated, run.tokenizer, max_prompt_length=max_length - 1, max_length=max_length,
                            training=False)
    return [t.response_ids[: max_length - len(e.prompt_ids)] for t, e in zip(tokenized, examples)]


def cached_teacher_samples(run: Run, *, seed: int = 10, targets: Literal["text", "ids"] = "text",
                           capped_ending: CappedEnding = "open") -> PseudoTargetSource:
    """``[x ‖ y]`` with one teacher sample per training prompt, generated once
    (seeded) and cached on disk keyed by teacher, prompts and sampler
    settings, so every SeqKD run on the same teacher reuses them.

    ``targets = "text"`` (the reference) trains on the samples' text
    re-tokenized as dataset responses (:func:`retokenized`: every target
    ends with EOS); ``"ids"`` on the sampled token ids, ended as
    ``capped_ending`` says."""
    prompts = [e.prompt_ids for e in run.train_examples]
    generation = run.config.recipe.generation
    key = fingerprint(run.teacher_id, prompts, generation.__dict__, run.config.recipe.data.max_length, seed,
                      "row-keyed")
    path = cache_root() / "teacher_generations" / f"{key}.json"
    if path.is_file():
        responses = json.loads(path.read_text())
        log.info("reusing %d cached teacher generations from %s", len(responses), path)
    else:
        responses = _generate_shared(run, prompts, generation.batch_size, seed)
        if run.process_index == 0:
            write_json_atomic(path, responses)
    if targets == "text":
        responses = retokenized(run, run.train_examples, responses)
    elif capped_ending == "eos":
        responses = [ended_with_eos(r, run.tokenizer.eos_token_id) for r in responses]
    by_prompt = {tuple(p): r for p, r in zip(prompts, responses)}

    def make_batch(examples: ExampleBatch) -> TrainBatch:
        return collate(_prompts(examples), [by_prompt[tuple(e.prompt_ids)] for e in examples],
                       run.tokenizer.pad_token_id)

    return make_batch


def _generate_shared(run: Run, prompts: list[list[int]], batch_size: int, seed: int) -> list[list[int]]:
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


def mixture(run: Run, *, fraction: float = 0.5, schedule: str = "constant",
            capped_ending: CappedEnding = "open") -> PseudoTargetSource:
    """A coin flip per optimizer step (GKD): student samples with probability
    ``fraction * schedule(k, K)``, otherwise the dataset responses."""
    on_policy, off_policy = student_samples(run, capped_ending=capped_ending), dataset_responses(run)

    def make_batch(examples: ExampleBatch) -> TrainBatch:
        probability = fraction * run.schedule(schedule)
        coin = torch.rand((), generator=_generator(run.config.training.seed, "mixture", run.step))
        use_student = bool(coin < probability)  # one coin per optimizer step, the same in every process
        return (on_policy if use_student else off_policy)(examples)

    return make_batch


def _generator(*parts: Any) -> torch.Generator:
    """A CPU generator seeded by a stable hash of ``parts`` (same in every process)."""
    return torch.Generator().manual_seed(int(fingerprint(*parts), 16))


class TeacherMixedRollouts:
    """A rollout buffer (MiniLLM): a source with state, checkpointed by the trainer.

    Every ``epochs`` passes over the buffer it collects ``size`` new rollouts
    (split over the processes of a multi-process run):
    prompts from the training set (a seeded permutation per data epoch),
    responses from the shared sampler drawing each token from
    ``(1 - mix_weight) q + mix_weight p`` (student q, frozen teacher p), then
    one no-grad teacher-forced pass of each model for log q_old(y_t),
    log p(y_t) and, with ``keep_teacher_logits``, the teacher's logits at the
    response positions (so a loss needs no teacher pass over rollouts).
    Each call returns the next ``len(examples)`` rollouts of the current
    shuffled pass as a :class:`RolloutBatch`, with the examples' dataset
    responses as its ``lm`` batch.  ``capped_ending``: see
    :func:`distillkit.sampling.sample` (the reference leaves capped rollouts
    open: microsoft/LMOps ``minillm/minillm/trainer.py`` ``generate``).
    """

    def __init__(self, run: Run, *, size: int = 256, epochs: int = 4, mix_weight: float = 0.2,
                 keep_teacher_logits: bool = True, capped_ending: CappedEnding = "open") -> None:
        batch_size = run.config.training.batch_size
        if size <= 0 or size % batch_size:
            raise DistillkitError(f"rollout size ({size}) must be a positive multiple of training.batch_size "
                                  f"({batch_size}), so that no optimizer step spans two rollouts")
        generation = run.config.recipe.generation
        if generation.top_k > 0 or generation.top_p < 1.0 or generation.temperature != 1.0:
            raise DistillkitError("teacher-mixed rollouts need plain sampling (generation.top_k = 0, top_p = 1.0, "
                                  "temperature = 1.0): their log-probabilities are of the unfiltered distributions")
        if run.teacher.sampling_inputs()[1] is not None:
            raise NotImplementedError("teacher-mixed rollouts mix in the plain teacher; an adapter that prepends "
                                      "a prompt would need the prompt in the mix-in model too")
        self.run, self.size, self.epochs = run, size, epochs
        self.mix_weight, self.keep_teacher_logits = mix_weight, keep_teacher_logits
        self.capped_ending = capped_ending
        self.collections, self.passes, self.cursor = 0, 0, 0
        self.order: list[int] = []
        self.rollouts: list[dict[str, Any]] = []

    def __call__(self, examples: ExampleBatch) -> RolloutBatch:
        if self.cursor >= len(self.order):
            self._next_pass()
        chosen = [self.rollouts[i] for i in self.order[self.cursor : self.cursor + len(examples)]]
        self.cursor += len(examples)
        batch = collate([r["prompt"] for r in chosen], [r["response"] for r in chosen], self.run.tokenizer.pad_token_id)
        mask = batch.label_mask

        def scatter(key: str) -> torch.Tensor:
            rows = torch.cat([r[key] for r in chosen])
            full = rows.new_zeros((*mask.shape, *rows.shape[1:]))
            full[mask] = rows
            return full

        return RolloutBatch(batch.input_ids, batch.attention_mask, batch.response_mask, scatter("old_logprobs"),
                            scatter("teacher_logprobs"), scatter("teacher_logits") if self.keep_teacher_logits else None,
                            dataset_responses(self.run)(examples))

    def _next_pass(self) -> None:
        if not self.rollouts or self.passes == self.epochs:
            self.rollouts = self._collect()
            self.collections, self.passes = self.collections + 1, 0
        generator = _generator(self.run.config.training.seed, "pass", self.collections, self.passes)
        self.order, self.cursor = torch.randperm(len(self.rollouts), generator=generator).tolist(), 0
        self.passes += 1

    def _prompts(self) -> list[list[int]]:
        """This process's share of the ``size`` prompts of the next collection
        (consecutive slices of one seeded permutation of the training set per
        data epoch; process r of N takes every N-th from the r-th)."""
        examples, seed, run = self.run.train_examples, self.run.config.training.seed, self.run
        first = self.collections * self.size
        permutations = {}
        prompts = []
        for index in range(first + run.process_index, first + self.size, run.num_processes):
            epoch, position = divmod(index, len(examples))
            if epoch not in permutations:
                generator = _generator(seed, "prompts", epoch)
                permutations[epoch] = torch.randperm(len(examples), generator=generator).tolist()
            prompts.append(examples[permutations[epoch][position]].prompt_ids)
        return prompts

    @torch.no_grad()
    def _collect(self) -> list[dict[str, Any]]:
        run, prompts = self.run, self._prompts()
        teacher = run.teacher.sampling_inputs()[0]
        was_training = run.student.training
        run.student.eval()
        rollouts = []
        log.info("collecting %d rollouts (teacher mix-in weight %g)", len(prompts), self.mix_weight)
        for start in range(0, len(prompts), run.config.recipe.generation.batch_size):
            chunk = prompts[start : start + run.config.recipe.generation.batch_size]
            responses = run.sample(run.student, chunk, mix_model=teacher, mix_weight=self.mix_weight,
                                   capped_ending=self.capped_ending)
            batch = collate(chunk, responses, run.tokenizer.pad_token_id).to(next(teacher.parameters()).device)
            mask = batch.label_mask
            teacher_logits = run.teacher_logits(batch)
            per_token = {
                "old_logprobs": masked_token_logprobs(run.student_logits(batch), batch.labels, mask),
                "teacher_logprobs": masked_token_logprobs(teacher_logits, batch.labels, mask),
            }
            if self.keep_teacher_logits:
                per_token["teacher_logits"] = teacher_logits[mask]
            lengths = mask.sum(-1).tolist()
            split = {key: value.cpu().split(lengths) for key, value in per_token.items()}
            for row, (prompt, response) in enumerate(zip(chunk, responses)):
                rollouts.append({"prompt": prompt, "response": response, **{k: v[row] for k, v in split.items()}})
        run.student.train(was_training)
        return rollouts

    def state_dict(self) -> dict[str, Any]:
        return {"collections": self.collections, "passes": self.passes, "cursor": self.cursor, "order": self.order,
                "rollouts": self.rollouts}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


@hookimpl
def distillkit_register_sources() -> list[SourceFactory]:
    return [
        SourceFactory("dataset", "the dataset's reference responses", dataset_responses),
        SourceFactory("student", "fresh samples from the current student", student_samples),
        SourceFactory("teacher", "samples from the (adapted) teacher, on the fly", teacher_samples),
        SourceFactory("teacher_cache", "one teacher sample per prompt, generated once and cached", cached_teacher_samples),
        SourceFactory("mixture", "student samples with probability lambda, else dataset responses", mixture),
        SourceFactory("rollouts", "a buffer of teacher-mixed student samples, reused for several passes",
                      TeacherMixedRollouts),
    ]
