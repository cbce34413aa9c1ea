"""From a recipe to a trained student: tokenizer, data, models (with cached
supervised fine-tuning of the teacher and of the SFT student init), trainer.
With ``[teacher_signal] alignment`` the teacher keeps its own tokenizer and
vocabulary, and the registered alignment is built once for the run.

Prepared artefacts are cached under ``$DISTILLKIT_CACHE_DIR`` (default
``~/.cache/distillkit``), keyed by a hash of everything that determines them,
so a second method on the same recipe reuses the teacher.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from rich.console import Console

from distillkit import ARTEFACTS_VERSION
from distillkit.config import (
    LoggingConfig,
    ModelConfig,
    Recipe,
    RunConfig,
    TrainingConfig,
    build,
    load_recipe,
    resolve_run,
    to_dict,
)
from distillkit.data.prepare import (
    PreparedData,
    data_identity,
    prepare_data,
    recipe_teacher_tokenizer,
    recipe_tokenizer,
)
from distillkit.engine.layout import check_launch_layout, cpu_processes
from distillkit.engine.models import (
    check_length,
    check_shared_vocabulary,
    load_model,
    load_tokenizer,
    model_identity,
)
from distillkit.errors import DistillkitError
from distillkit.files import cache_root, exclusive, fingerprint, write_text_atomic
from distillkit.registry import registry
from distillkit.training.export import check_hub, push_folder
from distillkit.training.outputs import check_run_folder
from distillkit.training.trainer import Trainer

log = logging.getLogger(__name__)

@dataclass
class Session:
    """Shared state of one recipe: its tokenizer and tokenized data."""

    recipe: Recipe
    tokenizer: Any
    tokenizer_id: str
    data: PreparedData
    console: Console


def open_session(recipe: Recipe, console: Console) -> Session:
    """The recipe's tokenizer and data; under ``accelerate launch`` the main
    process prepares (and caches) them first, the others then read the cache."""
    with PartialState(cpu=cpu_processes()).main_process_first():
        tokenizer, tokenizer_id = recipe_tokenizer(recipe)
        return Session(recipe, tokenizer, tokenizer_id, prepare_data(recipe, tokenizer), console)


def model_tokenizer(session: Session, spec: ModelConfig) -> Any:
    """A path-loaded model's own tokenizer, unless the recipe sets a shared one."""
    shared = session.recipe.tokenizer.path or session.recipe.tokenizer.train_vocab_size
    if shared or spec.path is None:
        return session.tokenizer
    return load_tokenizer(spec.path, gguf_file=spec.gguf_file, trust_remote_code=spec.trust_remote_code)


def prepared_model(session: Session, role: str) -> tuple[torch.nn.Module, Path | None]:
    """The ``role`` model, supervised fine-tuned first when its spec has
    ``sft`` (cached).  Returns the model and its prepared folder, if any."""
    spec: ModelConfig = getattr(session.recipe, role)
    if spec.sft is None:
        return load_model(spec, session.tokenizer, role, teacher=session.recipe.teacher), None
    training = build(TrainingConfig, {**to_dict(session.recipe.training), **spec.sft}, f"{role}.sft")
    spec_identity = model_identity(spec, session.recipe.teacher)
    key = fingerprint(role, spec_identity, training.identity(), session.tokenizer_id, data_identity(session.recipe),
                      session.recipe.generation.identity(), ARTEFACTS_VERSION)
    folder = cache_root() / "models" / f"{session.recipe.name}-{role}-sft-{key}"
    best = folder / "best"
    state = PartialState(cpu=cpu_processes())
    # one run prepares it at a time (its main process holds the lock; its other processes train along)
    with exclusive(folder, enabled=state.is_main_process):
        state.wait_for_everyone()
        if not (folder / "DONE").is_file():
            session.console.print(f"[bold]preparing the {role}[/]: supervised fine-tuning into {folder} (cached)")
            model = load_model(spec, session.tokenizer, role, teacher=session.recipe.teacher)
            check_length(model, session.recipe.data.max_length, role)
            # a cached preparation, shared by runs: not one of the runs the experiment trackers compare
            config = RunConfig(recipe=dataclasses.replace(session.recipe, logging=LoggingConfig()), method="sft",
                               options=registry().methods["sft"].options(), training=training)
            Trainer(config, model, session.tokenizer, session.data.train, session.data.validation, folder,
                    resume=True, console=session.console).fit()
            if state.is_main_process:
                write_text_atomic(folder / "DONE", "complete\n")
        state.wait_for_everyone()
    model_spec = dataclasses.replace(spec, path=str(best), config=None, gguf_file=None, sft=None, init_from=None,
                                     num_layers=None)
    return load_model(model_spec, session.tokenizer, role), best


def train(
    method_name: str,
    recipe_name: str,
    *,
    output: Path | None = None,
    overrides: list[str] | None = None,
    max_steps: int | None = None,
    resume: bool = False,
    console: Console | None = None,
    push_to_hub: str | None = None,
) -> Path:
    """``distillkit train``: returns the best student checkpoint folder,
    uploaded at the end to the Hub repository ``push_to_hub`` if given (the
    Hub is checked before any model is loaded)."""
    console = console or Console(stderr=True)
    check_launch_layout()
    method = registry().methods[method_name]
    recipe = load_recipe(recipe_name, overrides)
    config = resolve_run(recipe, method_name)
    if max_steps is not None:
        if max_steps < 0:
            raise DistillkitError(f"--max-steps must be >= 0 (0: the recipe's epochs), got {max_steps}")
        config.training.max_steps = max_steps
    output = output or Path("runs") / recipe.name / method_name
    check_run_folder(output, config, resume=resume)  # before any model is loaded
    if push_to_hub is not None:
        check_hub(push_to_hub)
    session = open_session(recipe, console)
    teacher, teacher_dir, teacher_tokenizer, aligner = None, None, None, None
    alignment = recipe.teacher_signal.alignment
    if method.teacher_adapter is not None and alignment is not None:  # the teacher keeps its own tokenizer
        teacher_tokenizer, teacher_tokenizer_id = recipe_teacher_tokenizer(recipe)
        teacher = load_model(recipe.teacher, teacher_tokenizer, "teacher")  # assembly refused teacher.sft
        aligner = registry().alignments[alignment].build(teacher_tokenizer, session.tokenizer)
    elif method.teacher_adapter is not None:
        teacher, teacher_dir = prepared_model(session, "teacher")
    if config.student_init == "sft":
        student_spec = dataclasses.replace(recipe.student, sft=recipe.student.sft or {})
        student, _ = prepared_model(dataclasses.replace(session, recipe=dataclasses.replace(recipe, student=student_spec)),
                                    "student")
    else:
        student = load_model(recipe.student, session.tokenizer, "student", teacher=recipe.teacher)
    check_length(student, recipe.data.max_length, "student")
    if teacher is not None:
        check_length(teacher, recipe.data.max_length, "teacher")
        if aligner is None:
            check_shared_vocabulary(model_tokenizer(session, recipe.teacher), model_tokenizer(session, recipe.student))
    teacher_id = str(teacher_dir or f"{recipe.teacher.path}:{recipe.teacher.gguf_file}")
    if teacher_tokenizer is not None:  # a teacher built from config depends on its tokenizer's size
        teacher_id += f":{teacher_tokenizer_id}"
    trainer = Trainer(config, student, session.tokenizer, session.data.train, session.data.validation, output,
                      teacher=teacher, teacher_id=teacher_id, resume=resume, console=console,
                      teacher_tokenizer=teacher_tokenizer, aligner=aligner)
    if teacher_dir is not None and trainer.accelerator.is_main_process:
        link = output / "teacher"
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(teacher_dir.resolve(), target_is_directory=True)
    best = trainer.fit()
    console.print(f"[green]done[/]: best student in {best}")
    if push_to_hub is not None and trainer.accelerator.is_main_process:
        console.print(f"[green]pushed[/]: {push_folder(best, push_to_hub)}")
    return best
