"""Validation during training: ROUGE-L of sampled responses and the loss
of the dataset responses, split over the processes (with per-prompt
sampling noise, so the result does not depend on the layout), and the
choice of the best student."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from rich.progress import Progress

from distillkit.api import TokenizedExample, collate
from distillkit.evaluation.protocol import evaluate, validation_sampling
from distillkit.training.accelerator import GlobalSums, is_sharded
from distillkit.training.run import Run

SHOWN_SAMPLES = 8  # sampled validation responses kept for the trackers' table (this process's first ones)


@dataclass(frozen=True)
class ValidationSample:
    """One sampled validation response with its prompt (as the model saw it) and first reference."""

    prompt: str
    response: str
    reference: str


def is_improvement(metric: float, best: float | None, select_by: str) -> bool:
    """Whether ``metric`` beats the best so far (ROUGE-L higher, loss lower);
    a NaN score never becomes the best."""
    if not math.isfinite(metric):
        return False
    return best is None or (metric > best if select_by == "rougeL" else metric < best)


class Validation:
    """The validation examples (the first ``training.eval_limit``) of a run."""

    def __init__(self, run: Run, examples: list[TokenizedExample], accelerator: Accelerator) -> None:
        self.run, self.accelerator = run, accelerator
        self.examples = examples[: run.config.training.eval_limit or None]

    def share(self) -> list[TokenizedExample]:
        """This process's share of the examples (every N-th), or all of them
        when models are sharded (then every process must run the same
        forward passes)."""
        if is_sharded(self.accelerator):
            return self.examples
        return self.examples[self.accelerator.process_index :: self.accelerator.num_processes]

    @torch.no_grad()
    def loss_sum(self, examples: list[TokenizedExample]) -> tuple[float, int]:
        """(sum of the response tokens' losses in nats, number of those tokens)."""
        run = self.run
        run.student.eval()
        total, tokens = 0.0, 0
        size = run.config.training.micro_batch_size
        for start in range(0, len(examples), size):
            chunk = examples[start : start + size]
            batch = collate([e.prompt_ids for e in chunk], [e.response_ids for e in chunk], run.tokenizer.pad_token_id)
            batch = batch.to(self.accelerator.device)
            total += float(run.cross_entropy(run.student_response_logits(batch), batch)) * batch.num_response_tokens
            tokens += batch.num_response_tokens
        return total, tokens

    def metrics(self, sums: GlobalSums, progress: Progress) -> tuple[dict[str, float], list[ValidationSample]]:
        """``{"rougeL", "loss"}`` over all validation examples, sampled with
        the training seed (a ``progress`` task counts the responses), and the
        first :data:`SHOWN_SAMPLES` responses of this process's share."""
        recipe = self.run.config.recipe
        share = self.share()
        task = progress.add_task("validation", total=len(share), status="")
        result = evaluate(self.accelerator.unwrap_model(self.run.student), self.run.tokenizer, share,
                          validation_sampling(recipe),
                          seeds=[self.run.config.training.seed], batch_size=recipe.generation.batch_size,
                          max_length=recipe.data.max_length, progress=lambda n: progress.advance(task, n))
        progress.remove_task(task)
        totals = [result.mean * len(share), len(share), *self.loss_sum(share)]
        rouge_sum, count, loss_sum, tokens = totals if is_sharded(self.accelerator) else sums.of(totals)
        responses = result.samples[self.run.config.training.seed][:SHOWN_SAMPLES]
        samples = [ValidationSample(self.run.tokenizer.decode(e.prompt_ids, skip_special_tokens=True), response.strip(),
                                    e.example.references[0]) for e, response in zip(share, responses)]
        return {"rougeL": rouge_sum / max(count, 1), "loss": loss_sum / max(tokens, 1)}, samples
