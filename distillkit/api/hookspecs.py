"""Hook specifications: the single page a plugin author reads.

A plugin is any module (or object) that implements some of the hooks below,
decorated with ``@distillkit.hookimpl``.  distillkit finds plugins through the
entry-point group ``distillkit``; its own built-in methods, divergences,
schedules, sources, teacher adapters, datasets and recipes are registered
through that very group, so built-ins and third-party plugins are equals::

    # pyproject.toml of your package
    [project.entry-points.distillkit]
    my_method = "my_package.my_method"

Every hook here is a *registration* hook: it is called once at start-up, with
no arguments, and returns a list of named components.  All plugins are asked
(collect-all) and the results are merged into one registry; two plugins that
register the same name in the same category is an error that names both.

A run is then assembled by name (never by ``if method == ...``):

1. the **method** (``distillkit_register_methods``) names its parts:
2. a **pseudo-target source** (``distillkit_register_sources``): where the
   training sequences come from (dataset responses, teacher generations,
   student samples, mixtures);
3. a **teacher adapter** (``distillkit_register_teacher_adapters``): how the
   teacher is used (frozen, or with trainable soft prompt / LoRA);
4. **divergences** (``distillkit_register_divergences``): token-level losses
   between the trainable and the target distribution;
5. **schedules** (``distillkit_register_schedules``): coefficients as a
   function of the optimizer step ``k`` and the total ``K``.

The component types (``Method``, ``Divergence``, ...) are defined in
:mod:`distillkit.api.components`; their docstrings give the exact contracts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from pathlib import Path

    from distillkit.api import (
        DataFormat,
        DatasetSpec,
        Divergence,
        Method,
        Schedule,
        SourceFactory,
        TeacherAdapterFactory,
    )

hookspec = pluggy.HookspecMarker("distillkit")


# --- methods -----------------------------------------------------------------


@hookspec
def distillkit_register_methods() -> list[Method]:
    """Return the distillation methods this plugin provides.

    A :class:`~distillkit.api.Method` is a named composition of a
    pseudo-target source, a teacher adapter and one or more update stages
    whose losses use divergences and schedules.  Its ``options`` dataclass
    declares the hyper-parameters a recipe may set under ``[methods.NAME]``.
    """


# --- the four hook points ------------------------------------------------------


@hookspec
def distillkit_register_sources() -> list[SourceFactory]:
    """Return pseudo-target sources: where training sequences come from.

    A source turns a batch of dataset examples (prompt and reference
    response token ids) into a teacher-forcing batch ``[x ‖ y]`` with a
    response mask, e.g. by taking the dataset response or by sampling ``y``
    from the student.
    """


@hookspec
def distillkit_register_teacher_adapters() -> list[TeacherAdapterFactory]:
    """Return teacher adapters: how the teacher model is wrapped for a run.

    An adapter gives teacher logits aligned with the student's input ids and
    may own trainable parameters (a soft prompt, LoRA); the teacher's own
    weights never train.
    """


@hookspec
def distillkit_register_divergences() -> list[Divergence]:
    """Return token-level divergences between a trainable and a target
    distribution, each computed from logits over the full vocabulary."""


@hookspec
def distillkit_register_schedules() -> list[Schedule]:
    """Return coefficient schedules ``f(k, K) -> float`` (k: optimizer step,
    K: total optimizer steps)."""


# --- data and recipes ----------------------------------------------------------


@hookspec
def distillkit_register_data_formats() -> list[DataFormat]:
    """Return row formats: small functions mapping one raw row (a dict) to an
    instruction example (instruction, input, reference responses)."""


@hookspec
def distillkit_register_datasets() -> list[DatasetSpec]:
    """Return named datasets: where the files of each split live (a hub id
    or a folder under ``DISTILLKIT_DATA_DIR``) and which row format they use."""


@hookspec
def distillkit_register_recipe_dirs() -> list[Path]:
    """Return folders holding recipe files (``NAME.toml``); the file stem is
    the recipe name used by ``distillkit train --recipe NAME``."""
