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
from distillkit.api import VocabularyAligner
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


@dataclass(frozen=True)
class Preparation:
    """The cached supervised fine-tuning of a model (``[ROLE.sft]``): its run
    (the ``sft`` method) and its cache folder, complete once it holds ``DONE``."""

    role: str
    config: RunConfig
    folder: Path

    @property
    def done(self) -> bool:
        return (self.folder / "DONE").is_file()


def preparation(session: Session, role: str) -> Preparation | None:
    """The SFT preparation of the ``role`` model, keyed by everything that
    determines it; None when its spec has no ``sft``."""
    spec: ModelConfig = getattr(session.recipe, role)
    if spec.sft is None:
        return None
    training = build(TrainingConfig, {**to_dict(session.recipe.training), **spec.sft}, f"{role}.sft")
    key = fingerprint(role, model_identity(spec, session.recipe.teacher), training.identity(), session.tokenizer_id,
                      data_identity(session.recipe), session.recipe.generation.identity(), ARTEFACTS_VERSION)
    # a cached preparation, shared by runs: not one of the runs the experiment trackers compare
    config = RunConfig(recipe=dataclasses.replace(session.recipe, logging=LoggingConfig()), method="sft",
                       options=registry().methods["sft"].options(), training=training)
    return Preparation(role, config, cache_root() / "models" / f"{session.recipe.name}-{role}-sft-{key}")


def sft_student(session: Session) -> Session:
    """``session`` with the student spec of the SFT student init
    (``student_init = "sft"``): ``[student.sft]``, by default the recipe's training."""
    recipe = session.recipe
    student = dataclasses.replace(recipe.student, sft=recipe.student.sft or {})
    return dataclasses.replace(session, recipe=dataclasses.replace(recipe, student=student))


def prepared_model(session: Session, role: str) -> tuple[torch.nn.Module, Path | None]:
    """The ``role`` model, supervised fine-tuned first when its spec has
    ``sft`` (cached).  Returns the model and its prepared folder, if any."""
    spec: ModelConfig = getattr(session.recipe, role)
    prep = preparation(session, role)
    if prep is None:
        return load_model(spec, session.tokenizer, role, teacher=session.recipe.teacher), None
    folder = prep.folder
    best = folder / "best"
    state = PartialState(cpu=cpu_processes())
    # one run prepares it at a time (its main process holds the lock; its other processes train along)
    with exclusive(folder, enabled=state.is_main_process):
        state.wait_for_everyone()
        if not prep.done:
            session.console.print(f"[bold]preparing the {role}[/]: supervised fine-tuning into {folder} (cached)")
            model = load_model(spec, session.tokenizer, role, teacher=session.recipe.teacher)
            check_length(model, session.recipe.data.max_length, role)
            Trainer(prep.config, model, session.tokenizer, session.data.train, session.data.validation, folder,
                    resume=True, console=session.console).fit()
            if state.is_main_process:
                write_text_atomic(folder / "DONE", "complete\n")
        state.wait_for_everyone()
    model_spec = dataclasses.replace(spec, path=str(best), config=None, gguf_file=None, sft=None, init_from=None,
                                     num_layers=None)
    return load_model(model_spec, session.tokenizer, role), best


@dataclass
class RunModels:
    """The models of one run as :class:`Trainer` takes them: the student, and
    the teacher (None for a method without one) with its id, its prepared
    folder, its own tokenizer and the vocabulary alignment (these two with
    ``[teacher_signal] alignment``)."""

    student: torch.nn.Module
    teacher: torch.nn.Module | None
    teacher_id: str
    teacher_dir: Path | None
    teacher_tokenizer: Any
    aligner: VocabularyAligner | None

    def teacher_folder(self) -> Path | None:
        """The teacher's folder: the prepared one, else the local folder it
        loaded from (a de-quantised GGUF, a local path); None for a teacher
        built from a config or read from the Hub cache."""
        if self.teacher_dir is not None or self.teacher is None:
            return self.teacher_dir
        loaded_from = self.teacher.name_or_path  # "" when built from a config
        return Path(loaded_from) if loaded_from and Path(loaded_from).is_dir() else None

    def trainer_options(self) -> dict[str, Any]:
        """The :class:`Trainer` keywords of the teacher side."""
        return {"teacher": self.teacher, "teacher_id": self.teacher_id, "teacher_tokenizer": self.teacher_tokenizer,
                "aligner": self.aligner}


def run_models(session: Session, config: RunConfig, *, prepared: bool = True) -> RunModels:
    """The student and teacher of ``config``'s run, checked against the data
    and each other; ``prepared``: with their cached SFT preparations (the
    teacher's ``[teacher.sft]``, the SFT student init), else as the recipe
    gives them (the same shapes, so the same cost per step)."""
    recipe = session.recipe
    method = registry().methods[config.method]
    teacher, teacher_dir, teacher_tokenizer, aligner = None, None, None, None
    alignment = recipe.teacher_signal.alignment
    if method.teacher_adapter is not None and alignment is not None:  # the teacher keeps its own tokenizer
        teacher_tokenizer, teacher_tokenizer_id = recipe_teacher_tokenizer(recipe)
        teacher = load_model(recipe.teacher, teacher_tokenizer, "teacher")  # assembly refused teacher.sft
        aligner = registry().alignments[alignment].build(teacher_tokenizer, session.tokenizer)
    elif method.teacher_adapter is not None and prepared:
        teacher, teacher_dir = prepared_model(session, "teacher")
    elif method.teacher_adapter is not None:
        teacher = load_model(recipe.teacher, session.tokenizer, "teacher", teacher=recipe.teacher)
    if config.student_init == "sft" and prepared:
        student, _ = prepared_model(sft_student(session), "student")
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
    return RunModels(student, teacher, teacher_id, teacher_dir, teacher_tokenizer, aligner)


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
    registry().methods[method_name]  # an unknown name fails first (with a "did you mean")
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
    models = run_models(session, config)
    trainer = Trainer(config, models.student, session.tokenizer, session.data.train, session.data.validation, output,
                      resume=resume, console=console, **models.trainer_options())
    teacher_folder = models.teacher_folder()
    if teacher_folder is not None and trainer.accelerator.is_main_process:
        link = output / "teacher"
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(teacher_folder.resolve(), target_is_directory=True)
    best = trainer.fit()
    console.print(f"[green]done[/]: best student in {best}")
    if push_to_hub is not None and trainer.accelerator.is_main_process:
        console.print(f"[green]pushed[/]: {push_folder(best, push_to_hub)}")
    return best
