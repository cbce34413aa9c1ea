"""A measured time estimate of a bench (``distillkit bench --dry-run
--time-steps N``): short real measurements on this machine, extrapolated to
the recipe's budget.

Measured, on the models as the recipe gives them (without the cached SFT
preparations: the same shapes, so the same cost per step), each trainer
built on the first (1 + N) x ``batch_size`` training examples without
validation examples, in a scratch run folder:

- a method's seconds per optimizer step: the mean of N steps after one
  warm-up step (a mean, so that work done every few steps, such as
  MiniLLM's rollout collection every ``ppo_epochs`` steps, counts; N should
  then span such a period); x its resolved total steps;
- its setup: the trainer's construction, whose one-off work over the
  training examples (:attr:`~distillkit.training.trainer.Trainer.data_setup_s`:
  the source, e.g. SeqKD's teacher generations, and a top-k teacher-signal
  fill) is scaled x (training examples / examples used).  It runs against a
  scratch cache, so it is the cost with a cold cache and writes nothing
  into ``$DISTILLKIT_CACHE_DIR`` (only opening the recipe and loading the
  models write there, as a run does: tokenizer, data, a GGUF conversion);
- sampling: per model (the teacher; the student, one architecture for every
  method), the seconds per prompt of one ``generation.batch_size`` batch of
  each test set (the final evaluation's settings) and of the validation
  prompts (validation's settings).  An evaluation costs that x the set's
  examples (after ``--limit``) x seeds, a run's validations
  ceil(steps / eval interval) x ``eval_limit`` prompts.  An untrained student
  may not stop before ``max_new_tokens``, so its rates lean high;
- the shared preparations, counted once: the teacher's SFT (``[teacher.sft]``)
  and the SFT student init (a method with ``student_init = "sft"``), as the
  ``sft`` step on that model x their steps, with their validations; 0 when
  cached.

Not counted: model loading, process starts, checkpoint writes and the
validation loss pass.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import os
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console, Group
from rich.table import Table

from distillkit.api import TokenizedExample
from distillkit.config import LoggingConfig, Recipe, RunConfig, TrainingConfig, resolve_run
from distillkit.engine.models import check_length, load_model
from distillkit.errors import DatasetUnavailable, DistillkitError
from distillkit.evaluation.protocol import eval_device, eval_setup, generate, load_test_set, validation_sampling
from distillkit.files import CACHE_ENV
from distillkit.registry import registry
from distillkit.training.batches import eval_interval, total_steps
from distillkit.training.pipeline import (
    Preparation,
    RunModels,
    Session,
    open_session,
    preparation,
    run_models,
    sft_student,
)
from distillkit.training.trainer import Trainer

VALIDATION = "validation"  # the sampling-rate key of the validation prompts


@dataclass
class Sampling:
    """A model's measured sampling: seconds per prompt of each available test
    set (and of :data:`VALIDATION`), and the examples each set has."""

    seconds_per_prompt: dict[str, float]
    examples: dict[str, int]

    def eval_seconds(self, seeds: int) -> float:
        """Seconds of evaluating every available set with ``seeds`` seeds."""
        return sum(self.seconds_per_prompt[name] * count * seeds for name, count in self.examples.items())


@contextlib.contextmanager
def _scratch_cache(folder: Path) -> Iterator[None]:
    """``$DISTILLKIT_CACHE_DIR`` set to ``folder`` within (restored after)."""
    before = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(folder)
    try:
        yield
    finally:
        if before is None:
            del os.environ[CACHE_ENV]
        else:
            os.environ[CACHE_ENV] = before


def _release() -> None:
    """Free the memory of the models and trainers dropped so far."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _timed_generate(model: torch.nn.Module, tokenizer: Any, examples: list[TokenizedExample], settings: Any, *,
                    seed: int, batch_size: int, max_length: int) -> float:
    """Seconds per prompt of sampling one batch (the first ``batch_size`` of ``examples``)."""
    batch = examples[:batch_size]
    started = time.perf_counter()
    generate(model, tokenizer, batch, settings, seed=seed, batch_size=batch_size, max_length=max_length)
    return (time.perf_counter() - started) / len(batch)


def measure_sampling(model: torch.nn.Module, tokenizer: Any, recipe: Recipe, sets: list[str], *, limit: int,
                     subsets: dict[str, int], seed: int, validation: list[TokenizedExample], missing: dict[str, str]) -> Sampling:
    """``model``'s sampling rates (see the module docstring; one warm-up
    sample first), on the evaluation's device (then moved back); sets whose
    data is absent go into ``missing`` (name -> reason)."""
    device = next(model.parameters()).device
    model.to(eval_device()).eval()
    setup = eval_setup(model, recipe, 0, notice=lambda text: None)
    loaded: dict[str, list[TokenizedExample]] = {}
    for name in sets:
        try:
            loaded[name], _ = load_test_set(name, tokenizer, setup, prompt=recipe.data.prompt, limit=limit,
                                            subset=subsets.get(name, 0), notice=lambda text: None)
        except DatasetUnavailable as error:
            missing[name] = error.reason
    warm = next(iter(loaded.values()), validation)[:1]
    if warm:
        generate(model, tokenizer, warm, setup.settings.with_overrides(max_new_tokens=1), seed=seed, batch_size=1,
                 max_length=setup.max_length)
    rates = {name: _timed_generate(model, tokenizer, examples, setup.settings, seed=seed,
                                   batch_size=setup.batch_size, max_length=setup.max_length)
             for name, examples in loaded.items()}
    if validation:
        rates[VALIDATION] = _timed_generate(model, tokenizer, validation, validation_sampling(recipe), seed=seed,
                                            batch_size=recipe.generation.batch_size,
                                            max_length=recipe.data.max_length)
    model.to(device)
    return Sampling(rates, {name: len(examples) for name, examples in loaded.items()})


def time_training(session: Session, config: RunConfig, models: RunModels, time_steps: int,
                  scratch: Path) -> tuple[float, float]:
    """(mean seconds per step, setup seconds extrapolated to all training
    examples) of ``config``'s run on ``models`` (see the module docstring)."""
    training = dataclasses.replace(config.training, max_steps=1 + time_steps, eval_every=0, save_every=0,
                                   final_checkpoint=False, progress_bar=False)
    timed = dataclasses.replace(config, recipe=dataclasses.replace(config.recipe, logging=LoggingConfig()),
                                training=training)
    used = session.data.train[: (1 + time_steps) * training.batch_size]
    seconds: list[float] = []
    with _scratch_cache(scratch / "cache"):
        started = time.perf_counter()
        trainer = Trainer(timed, models.student, session.tokenizer, used, [], Path(tempfile.mkdtemp(dir=scratch)),
                          console=Console(quiet=True), on_step=lambda report: seconds.append(report.seconds),
                          **models.trainer_options())
        built = time.perf_counter() - started
        trainer.fit()
    setup = built + trainer.data_setup_s * (len(session.data.train) / len(used) - 1)
    trainer.accelerator.free_memory()
    return statistics.fmean(seconds[1:]), setup


def _validations(training: TrainingConfig, session: Session, rate: float | None) -> tuple[int, float]:
    """(validations, their seconds) of a run with ``training`` at ``rate`` s/prompt."""
    prompts = len(session.data.validation[: training.eval_limit or None])
    if not prompts or rate is None:
        return 0, 0.0
    count = math.ceil(total_steps(training, len(session.data.train)) / eval_interval(training, len(session.data.train)))
    return count, count * prompts * rate


def _run_row(training: TrainingConfig, session: Session, per_step: float, setup: float,
             validation_rate: float | None, eval_s: float) -> dict[str, Any]:
    steps = total_steps(training, len(session.data.train))
    validations, validation_s = _validations(training, session, validation_rate)
    row = {"steps": steps, "seconds_per_step": per_step, "train_s": steps * per_step, "setup_s": setup,
           "validations": validations, "validation_s": validation_s, "eval_s": eval_s}
    return {**row, "total_s": row["train_s"] + setup + validation_s + eval_s}


def _load_as_given(session: Session, role: str) -> torch.nn.Module:
    """The ``role`` model as the recipe gives it (no SFT preparation)."""
    spec = getattr(session.recipe, role)
    model = load_model(spec, session.tokenizer, role, teacher=session.recipe.teacher)
    check_length(model, session.recipe.data.max_length, role)
    return model


def estimate_time(recipe: Recipe, methods: list[str], *, sets: list[str], seeds: list[int], limit: int,
                  subsets: dict[str, int], time_steps: int, console: Console) -> dict[str, Any]:
    """The measured time estimate of a bench of ``methods`` on ``recipe``
    (see the module docstring), JSON-ready: per method its steps, s/step and
    seconds of training, setup, validations and evaluation (``total_s``
    their sum); the shared ``preparations`` (role -> the same, or
    ``{"cached": true, "total_s": 0}``); ``teacher_eval_s`` (None without a
    teacher); the measured ``rates``; the ``missing`` test sets (name ->
    reason, not counted); ``total_s``, the sum of all parts."""
    if time_steps < 1:
        raise DistillkitError(f"--time-steps must be >= 1 to measure (0: no timing), got {time_steps}")
    configs = {method: resolve_run(recipe, method) for method in methods}  # before any model is loaded
    with_teacher = [m for m in methods if registry().methods[m].teacher_adapter is not None]
    session = open_session(recipe, console)
    missing: dict[str, str] = {}
    preparations: dict[str, dict[str, Any]] = {}
    steps_rates: dict[str, float] = {}
    teacher: Sampling | None = None

    def sampling(model: torch.nn.Module, tokenizer: Any, validation: list[TokenizedExample]) -> Sampling:
        return measure_sampling(model, tokenizer, recipe, sets, limit=limit, subsets=subsets, seed=seeds[0],
                                validation=validation, missing=missing)

    with tempfile.TemporaryDirectory(prefix="distillkit-timing-") as folder:
        scratch = Path(folder)
        console.print("[dim]timing: student sampling[/]")
        student_model = _load_as_given(session, "student")
        student = sampling(student_model, session.tokenizer, session.data.validation)
        needed: list[Preparation | None] = [
            preparation(session, "teacher") if with_teacher else None,
            preparation(sft_student(session), "student") if any(c.student_init == "sft" for c in configs.values())
            else None]
        for prep in filter(None, needed):
            if prep.done:
                preparations[prep.role] = {"cached": True, "folder": str(prep.folder), "total_s": 0.0}
                continue
            console.print(f"[dim]timing: the {prep.role}'s SFT preparation[/]")
            model, rates = student_model, student
            if prep.role == "teacher":
                model = _load_as_given(session, "teacher")
                rates = teacher = sampling(model, session.tokenizer, session.data.validation)
            per_step, setup = time_training(session, prep.config, RunModels(model, None, "", None, None, None),
                                            time_steps, scratch)
            del model
            steps_rates[f"{prep.role} sft"] = per_step
            preparations[prep.role] = {"cached": False, "folder": str(prep.folder), **_run_row(
                prep.config.training, session, per_step, setup, rates.seconds_per_prompt.get(VALIDATION), 0.0)}
        del student_model
        _release()
        rows: dict[str, dict[str, Any]] = {}
        for method in methods:
            console.print(f"[dim]timing: {method} ({1 + time_steps} steps)[/]")
            models = run_models(session, configs[method], prepared=False)
            if models.teacher is not None and teacher is None:  # before its adapter wraps it; it does not validate
                teacher = sampling(models.teacher, models.teacher_tokenizer or session.tokenizer, [])
            per_step, setup = time_training(session, configs[method], models, time_steps, scratch)
            del models
            _release()
            steps_rates[method] = per_step
            rows[method] = _run_row(configs[method].training, session, per_step, setup,
                                    student.seconds_per_prompt.get(VALIDATION), student.eval_seconds(len(seeds)))
    teacher_eval = teacher.eval_seconds(len(seeds)) if teacher is not None else None  # measured if a method has one
    total = sum(r["total_s"] for r in rows.values()) + sum(p["total_s"] for p in preparations.values())
    prompt_rates = {"student": student.seconds_per_prompt, **({"teacher": teacher.seconds_per_prompt} if teacher else {})}
    return {"recipe": recipe.name, "time_steps": time_steps, "device": eval_device(),
            "train_examples": len(session.data.train), "seeds": seeds, "limit": limit, "subsets": subsets, "methods": rows,
            "preparations": preparations, "teacher_eval_s": teacher_eval,
            "rates": {"seconds_per_step": steps_rates, "seconds_per_prompt": prompt_rates},
            "missing": missing, "total_s": total + (teacher_eval or 0.0)}


def duration(seconds: float) -> str:
    """``seconds`` for people: 12.3 s, 4m 05s, 2h 03m."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m {rest:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


def estimate_tables(estimate: dict[str, Any]) -> Group:
    """The estimate as rich tables: the time per part and in all, then the measured rates."""
    table = Table("method / part", "steps", "s/step", "training", "setup", "validations", "eval", "total",
                  title=f"time estimate (measured over {estimate['time_steps']} steps on {estimate['device']})",
                  caption="a method: its training, setup (one-off work, cold cache), validations and the evaluation "
                          "of its student; not counted: model loading, checkpoints")
    for method, row in estimate["methods"].items():
        table.add_row(method, f"{row['steps']:,}", f"{row['seconds_per_step']:.3f}",
                      duration(row["train_s"]), duration(row["setup_s"]),
                      f"{row['validations']} = {duration(row['validation_s'])}", duration(row["eval_s"]),
                      duration(row["total_s"]))
    for role, prep in estimate["preparations"].items():
        if prep["cached"]:
            table.add_row(f"{role} SFT (shared)", "cached", "", "", "", "", "", duration(0.0), style="dim")
        else:
            table.add_row(f"{role} SFT (shared)", f"{prep['steps']:,}", f"{prep['seconds_per_step']:.3f}",
                          duration(prep["train_s"]), duration(prep["setup_s"]),
                          f"{prep['validations']} = {duration(prep['validation_s'])}",
                          "", duration(prep["total_s"]))
    if estimate["teacher_eval_s"] is not None:
        eval_s = duration(estimate["teacher_eval_s"])
        table.add_row("eval teacher", "", "", "", "", "", eval_s, eval_s)
    table.add_section()
    table.add_row("all", "", "", "", "", "", "", duration(estimate["total_s"]), style="bold")
    rates = Table("measured", "of", "seconds", title="measured rates")
    for name, seconds in estimate["rates"]["seconds_per_step"].items():
        rates.add_row("optimizer step", name, f"{seconds:.4f}")
    for model, per_set in estimate["rates"]["seconds_per_prompt"].items():
        for name, seconds in per_set.items():
            rates.add_row("sampling, per prompt", f"{model} on {name}", f"{seconds:.4f}")
    notes = [f"{name}: missing ({reason}); not counted" for name, reason in estimate["missing"].items()]
    return Group(table, rates, *notes)
