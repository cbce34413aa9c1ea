"""The one training loop, on ``accelerate`` (CPU, one GPU, DDP, FSDP and
DeepSpeed ZeRO-1/2 through ``accelerate launch``).

Per optimizer step k: take the global batch of ``batch_size`` examples
(:mod:`~distillkit.training.batches`; with N processes each takes a
contiguous 1/N of it), let the method's source turn each micro-batch into
``[x ‖ y]``, then for each stage run all micro-batches (losses weighted so
that the step averages over all response tokens of the global batch,
whatever the layout), clip and step that stage's optimizer and LR schedule
(:mod:`~distillkit.training.optimizers`).  N processes therefore compute
the same update as one.  A non-finite loss or gradient norm stops the run
(or skips the update) before any parameter changes.  After each step the
stateful schedules advance and the method's ``after_step`` runs (every
process, from the step's logged values).  Every ``eval_every``
steps :mod:`~distillkit.training.validation` keeps the best student;
every ``save_every`` steps a checkpoint is written
(:mod:`~distillkit.training.checkpoints`), and ``resume`` continues from
the latest one that loads, after checking that the folder holds a run of
the same method and recipe (:mod:`~distillkit.training.outputs`).  Logged
records go to ``metrics.jsonl`` and to the recipe's experiment trackers
(:mod:`~distillkit.training.trackers`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from distillkit.api import Method, Stage, TokenizedExample, TrainBatch, VocabularyAligner
from distillkit.config import RunConfig
from distillkit.config.run_folder import (
    BEST,
    TrainerState,
    append_metrics,
    complete_checkpoints,
    truncate_metrics,
    write_run_file,
)
from distillkit.errors import DistillkitError
from distillkit.registry import registry
from distillkit.training.accelerator import (
    GlobalSums,
    backward,
    is_deepspeed,
    is_sharded,
    make_accelerator,
    peak_memory_mb,
    place_teacher,
)
from distillkit.training.batches import ExampleOrder, StepExamples, eval_interval, micro_chunks, total_steps
from distillkit.training.checkpoints import load_latest_checkpoint, run_state_owners, save_checkpoint
from distillkit.training.optimizers import GroupOptimizers
from distillkit.training.outputs import check_run_folder, save_best
from distillkit.training.run import Run
from distillkit.training.teacher_signals import prepare_teacher_signals
from distillkit.training.trackers import Trackers, tracker_dir
from distillkit.training.validation import Validation, is_improvement

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepReport:
    """One optimizer step, as ``Trainer(on_step=...)`` sees it: ``step`` is
    k after it (1..K), ``seconds`` its wall time (no validation or
    checkpointing), ``values`` what it logs (losses, ``grad_norm/GROUP``,
    ``lr/GROUP``, ``tokens_per_s``; averages over the global batch)."""

    step: int
    seconds: float
    values: dict[str, float]


class Trainer:
    """Trains ``student`` with a registered method; writes into ``output_dir``.

    ``example_order(epoch)`` (default: the recipe's, see
    :func:`~distillkit.training.batches.recipe_order`) gives the indices of
    ``train_examples`` in the order an epoch takes them; ``on_step`` is
    called in every process after each optimizer step with its
    :class:`StepReport`.  ``teacher_tokenizer`` and ``aligner``: a teacher
    with its own tokenizer and the built vocabulary alignment
    (``[teacher_signal] alignment``; see :class:`~distillkit.training.run.Run`).
    ``data_setup_s``: the seconds the construction spent on the one-off work
    over the training examples (building the source, e.g. SeqKD's teacher
    generations, and filling the top-k teacher-signal cache)."""

    def __init__(
        self,
        config: RunConfig,
        student: torch.nn.Module,
        tokenizer: Any,
        train_examples: list[TokenizedExample],
        validation_examples: list[TokenizedExample],
        output_dir: Path,
        *,
        teacher: torch.nn.Module | None = None,
        teacher_id: str = "",
        resume: bool = False,
        console: Console | None = None,
        example_order: ExampleOrder | None = None,
        on_step: Callable[[StepReport], None] | None = None,
        teacher_tokenizer: Any = None,
        aligner: VocabularyAligner | None = None,
    ) -> None:
        self.config, self.training = config, config.training
        self.method: Method = registry().methods[config.method]
        self.tokenizer, self.output_dir, self.on_step = tokenizer, output_dir, on_step
        self.console = console or Console(stderr=True)
        if not train_examples:
            raise DistillkitError("no training examples left after filtering; check data.max_prompt_length")
        self.accelerator = make_accelerator(self.training, config.recipe.logging.report_to, tracker_dir(output_dir))
        self.deepspeed, self.sharded = is_deepspeed(self.accelerator), is_sharded(self.accelerator)
        self.sums = GlobalSums(self.accelerator)
        set_seed(self.training.seed)
        self.state = TrainerState()
        processes, rank = self.accelerator.num_processes, self.accelerator.process_index
        self.examples = StepExamples(train_examples, self.training, process_index=rank, num_processes=processes,
                                     order=example_order)
        if self.sharded and self.training.select_by == "rougeL" and validation_examples:
            raise DistillkitError(
                "FSDP: validation by ROUGE-L would generate from the sharded student outside the training loop, "
                "which is not supported yet; set training.select_by = 'loss' (--set training.select_by=loss)")
        self.run = Run(config, student, tokenizer, total_steps=total_steps(self.training, len(train_examples)),
                       train_examples=train_examples, teacher_id=teacher_id, process_index=rank,
                       num_processes=processes, keep_going=self.sums.any if self.sharded else bool,
                       global_sum=self.sums.of_tensor, teacher_tokenizer=teacher_tokenizer, aligner=aligner)
        if self.method.teacher_adapter is not None:
            if teacher is None:
                raise DistillkitError(f"method '{self.method.name}' needs a teacher; set [teacher] in the recipe")
            teacher = place_teacher(self.accelerator, teacher, config.recipe.teacher.placement)
            adapter = registry().teacher_adapters[self.method.teacher_adapter]
            self.run.teacher = adapter.build(teacher, self.run, **self.method.teacher_adapter_options(config.options))
        started = time.perf_counter()
        self.source = registry().sources[self.method.source].build(self.run, **self.method.source_options(config.options))
        with self._progress() as progress:
            self.signals = prepare_teacher_signals(self.run, self.accelerator, progress)
        self.data_setup_s = time.perf_counter() - started
        self.optimization = GroupOptimizers(self.accelerator, self.run, self.method)
        for name in self.method.schedules:
            if name not in registry().schedules or not registry().schedules[name].stateful:
                raise DistillkitError(f"method '{self.method.name}' declares '{name}' in Method.schedules, which is "
                                      "not a registered schedule with state; declare only schedules with state")
        self.state_owners = run_state_owners(self.optimization.state_owners(), self.run.teacher, self.source,
                                             self.run.schedule_states if self.method.schedules else None)
        self.validation = Validation(self.run, validation_examples, self.accelerator)
        self.trackers = Trackers(self.accelerator, config, output_dir)
        log.info("method %s, trainable parameters: %s", self.method.name, self.optimization.describe())
        self._resume_or_start(resume)
        self.accelerator.wait_for_everyone()  # every process has checked the folder before any writes to it

    def _resume_or_start(self, resume: bool) -> None:
        latest = check_run_folder(self.output_dir, self.config, resume=resume)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if latest is None and resume:
            log.info("no checkpoint in %s: starting from step 0", self.output_dir)
        if latest is not None:
            self.state = load_latest_checkpoint(self.accelerator, self.output_dir, self.state_owners)
            self.run.step = self.state.step
            if self.accelerator.is_main_process:  # the state holds the sum over processes
                self.run.generated_tokens = self.state.generated_tokens
        if self.accelerator.is_main_process:  # drop the records of steps this run will redo
            truncate_metrics(self.output_dir, self.state.step)

    # --- the step ------------------------------------------------------------

    def examples_for_step(self, step: int) -> list[TokenizedExample]:
        """This process's share of the global batch of optimizer step ``step`` (0-based)."""
        return self.examples.for_step(step)

    def micro_batches(self, examples: list[TokenizedExample]) -> list[TrainBatch]:
        """The method's source's batches of ``examples``, ``micro_batch_size`` each (by length with
        ``sort_micro_batches``), on the device."""
        if self.training.sort_micro_batches:
            examples = sorted(examples, key=lambda e: len(e.prompt_ids) + len(e.response_ids))
        batches = [self.source(chunk) for chunk in micro_chunks(examples, self.training.micro_batch_size)]
        if self.signals is not None:
            batches = [self.signals.attach(batch) for batch in batches]
        return [batch.to(self.accelerator.device) for batch in batches]

    def train_step(self) -> dict[str, float]:
        """One optimizer step of every stage; returns logged values (averages
        over the global batch's response tokens; with an alignment also
        ``aligned_fraction``, of the student response positions the teacher's
        signal covers)."""
        batches = self.micro_batches(self.examples_for_step(self.state.step))
        self.run.aligned = [0, 0]
        (global_tokens,) = self.sums.of([sum(b.num_response_tokens for b in batches)])
        terms_by_key: dict[str, float] = {}
        logs: dict[str, float] = {}
        for stage in self.method.stages:
            self.run.student.train(stage.student_mode_for(self.config.options) == "train")
            loss_sum = self._backward_stage(stage, batches, global_tokens, terms_by_key)
            self._check_gradients_stay_in(stage)
            logs.update(self._update(stage.trains, loss_sum))
        local_positions = sum(int(b.attention_mask.sum()) for b in batches)
        *term_values, positions, generated = self.sums.of(
            [*terms_by_key.values(), local_positions, self.run.generated_tokens])
        self.state.tokens += int(positions)
        self.state.generated_tokens = int(generated)
        if self.run.aligner is not None:
            aligned, positions = self.sums.of(self.run.aligned)
            logs["aligned_fraction"] = aligned / max(positions, 1)
        return {**dict(zip(terms_by_key, term_values)), **logs}

    def _backward_stage(self, stage: Stage, batches: list[TrainBatch], global_tokens: float,
                        terms_by_key: dict[str, float]) -> float:
        """Forward and backward of every micro-batch through ``stage.loss``,
        adding its weighted terms to ``terms_by_key``; returns this process's
        share of the stage's loss."""
        engine = self.deepspeed and stage.trains == "student"  # the DeepSpeed engine clips and steps
        processes = self.accelerator.num_processes
        loss_sum = 0.0
        for index, batch in enumerate(batches):
            weight = batch.num_response_tokens / max(global_tokens, 1)
            last = index == len(batches) - 1
            with contextlib.nullcontext() if last else self.accelerator.no_sync(self.run.student):
                terms = stage.loss(self.run, batch)
                loss_sum += float(terms["loss"].detach()) * weight
                if engine and last and not self.sums.all_finite(loss_sum):  # the engine steps in this backward
                    self._non_finite(stage.trains, "loss")
                # gradients are averaged over processes, so scale by N to get the global token average
                backward(self.accelerator, terms["loss"] * (weight * processes), stage.trains, self.run.student,
                         last=last)
            for name, value in terms.items():
                key = name if len(self.method.stages) == 1 else f"{stage.trains}/{name}"
                terms_by_key[key] = terms_by_key.get(key, 0.0) + float(value.detach()) * weight
        return loss_sum

    def _check_gradients_stay_in(self, stage: Stage) -> None:
        """A stage's loss must reach only the parameters it trains (the others' gradients are None between
        their updates): a gradient elsewhere means a target meant to be constant is not, and the next update
        of that group would use it."""
        for group in self.optimization.groups:
            if group != stage.trains and any(p.grad is not None for p in self.optimization.parameters(group)):
                raise DistillkitError(
                    f"method '{self.method.name}': the loss of its '{stage.trains}' stage put gradients into the "
                    f"'{group}' parameters; compute the targets it takes from them under torch.no_grad()")

    def _update(self, group: str, loss_sum: float) -> dict[str, float]:
        """Clip and step ``group``'s optimizer and schedule, or skip the
        update of a non-finite loss or gradient; returns the logged values."""
        if group != "student" and self.accelerator.num_processes > 1:
            self.optimization.average_gradients(group)  # not DDP-wrapped: averaged by hand
        if self.deepspeed and group == "student":  # its engine clipped and stepped
            logs = {"grad_norm/student": float(self.run.student.get_global_grad_norm() or 0.0)}
        else:
            norm = self.optimization.clipped_norm(group, self.training.max_grad_norm)
            logs = {f"grad_norm/{group}": norm}
            if not self.sums.all_finite(loss_sum, norm):
                logs[f"skipped/{group}"] = self._non_finite(group, "loss" if not math.isfinite(loss_sum) else "gradient")
                logs[f"lr/{group}"] = self.optimization.skip(group)
                return logs
        logs[f"lr/{group}"] = self.optimization.step(group)
        return logs

    def _non_finite(self, group: str, what: str) -> int:
        """Stop the run at a non-finite loss or gradient of ``group`` (before
        any parameter changed), or, with ``training.on_nonfinite = "skip"``,
        count the skipped update and return 1."""
        step = self.state.step + 1
        if self.training.on_nonfinite == "skip":
            self.state.skipped_updates += 1
            log.warning("step %d: non-finite %s of %s, update skipped (%d so far)", step, what, group,
                        self.state.skipped_updates)
            return 1
        done = complete_checkpoints(self.output_dir)
        kept = f"the last checkpoint, {done[-1]}, is kept" if done else "no checkpoint was written yet"
        raise DistillkitError(
            f"step {step}: the {what} of {group} is not finite (NaN or inf), so the run stopped before updating; "
            f"{kept}; lower training.lr (now {self.training.lr:g}), check the method options, or set "
            "training.on_nonfinite = \"skip\" to skip such steps")

    # --- the loop ------------------------------------------------------------

    def fit(self) -> Path:
        """Train to K steps (or continue a resumed run); returns the best checkpoint."""
        total = self.run.total_steps
        eval_every = eval_interval(self.training, len(self.examples.examples))
        save_every = self.training.save_every or eval_every
        if self.accelerator.is_main_process:
            write_run_file(self.output_dir, self.config, total_steps=total,
                           trainable_parameters=self.optimization.trainable_counts())
        with self.trackers.running(self.state.step), self._progress() as progress:
            task = progress.add_task(f"{self.method.name}", total=total, completed=self.state.step, status="")
            while self.state.step < total:
                started, tokens_before = time.perf_counter(), self.state.tokens
                logs = self.train_step()
                seconds = time.perf_counter() - started
                self.state.step += 1
                self.run.step = step = self.state.step
                self.run.update_schedules(logs)
                if self.method.after_step is not None:
                    self.method.after_step(self.run, logs)
                self.state.elapsed_s += seconds
                self.state.peak_memory_mb = max(self.state.peak_memory_mb, peak_memory_mb(self.accelerator.device))
                logs["tokens_per_s"] = (self.state.tokens - tokens_before) / max(seconds, 1e-9)
                lr = next(v for k, v in logs.items() if k.startswith("lr/"))
                progress.update(task, advance=1, status=(
                    f"loss {logs.get('loss', logs.get('student/loss', 0.0)):.3f}  lr {lr:.2e}  "
                    f"{logs['tokens_per_s']:,.0f} tok/s"))
                if self.on_step is not None:
                    self.on_step(StepReport(step, seconds, dict(logs)))
                if step % self.training.log_every == 0 or step == total:
                    self._log({"step": step, **logs}, generated_tokens=self.state.generated_tokens)
                if step % eval_every == 0 or step == total:
                    self._validate(progress)
                if (step % save_every == 0 and step < total) or (step == total and self.training.final_checkpoint):
                    self.save_checkpoint()
            self.trackers.log({"step": self.state.step, "cost/train_s": self.state.elapsed_s,
                               "cost/peak_memory_mb": self.state.peak_memory_mb,
                               "cost/generated_tokens": self.state.generated_tokens,
                               "cost/trainable_parameters": sum(self.optimization.trainable_counts().values())})
        return self.output_dir / BEST

    def _progress(self) -> Progress:
        """A progress bar on the main process (unless ``training.progress_bar`` is off)."""
        columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TimeRemainingColumn(), TextColumn("{task.fields[status]}")]
        shown = self.accelerator.is_main_process and self.training.progress_bar
        return Progress(*columns, console=self.console, disable=not shown)

    def _validate(self, progress: Progress) -> None:
        """Validation metrics; an improvement becomes the best student."""
        if not self.validation.examples:
            return
        metrics, samples = self.validation.metrics(self.sums, progress)
        improved = is_improvement(metrics[self.training.select_by], self.state.best_metric, self.training.select_by)
        if improved:
            self.state.best_metric, self.state.best_step = metrics[self.training.select_by], self.state.step
            cost = {"elapsed_s": self.state.elapsed_s, "peak_memory_mb": self.state.peak_memory_mb,
                    "generated_tokens": self.state.generated_tokens, "tokens": self.state.tokens}
            save_best(self.accelerator, self.run.student, self.run.teacher, self.tokenizer, self.output_dir / BEST,
                      {"step": self.state.step, **metrics, "cost": cost}, recipe=self.config.recipe,
                      sharded=self.sharded)
        self._log({"step": self.state.step, "val/rougeL": metrics["rougeL"], "val/loss": metrics["loss"],
                   "best": improved})
        self.trackers.log_samples(samples, self.state.step)
        progress.console.log(f"step {self.state.step}: validation ROUGE-L {metrics['rougeL']:.2f}, "
                             f"loss {metrics['loss']:.3f}" + (" (best)" if improved else ""))

    def _log(self, record: dict[str, Any], **tracked: float) -> None:
        """``record`` (with its ``"step"``) into ``metrics.jsonl`` and, with the ``tracked`` values besides, to the
        experiment trackers."""
        if self.accelerator.is_main_process:
            append_metrics(self.output_dir, record)
        self.trackers.log({**record, **tracked})

    def save_checkpoint(self) -> None:
        """Checkpoint the current step (see :func:`~distillkit.training.checkpoints.save_checkpoint`)."""
        save_checkpoint(self.accelerator, self.output_dir, self.state, self.state_owners,
                        keep=self.training.keep_checkpoints)
