"""Hook specifications: the single page a plugin author reads.

A plugin is any module (or object) that implements some of the hooks below,
decorated with ``@distillkit.hookimpl``.  distillkit finds plugins through the
entry-point group ``distillkit``; its own built-in methods, divergences,
schedules, alignments, generation backends, sources, teacher adapters, datasets and recipes are registered
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
   function of the optimizer step ``k`` and the total ``K``;
6. **alignments** (``distillkit_register_alignments``): a teacher with
   another tokenizer than the student's (``[teacher_signal] alignment``);
7. a **generation backend** (``distillkit_register_generation_backends``):
   the sampler every sample is drawn with (``[generation] backend``).

The component types (``Method``, ``Divergence``, ...) are defined in
:mod:`distillkit.api.components`; their docstrings give the exact contracts.

Code that runs during training is not a hook but part of a component:
losses (``Stage.loss``), a method's per-step callback (``Method.after_step``,
called after each optimizer step) and stateful schedules' ``update``.  A hook
would be called in every run for every installed plugin; a component's
callback runs only in the runs that use it.
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
        GenerationBackend,
        Method,
        Schedule,
        SourceFactory,
        TeacherAdapterFactory,
        VocabularyAlignment,
    )

hookspec = pluggy.HookspecMarker("distillkit")

# Every hook below is called the same way: once per process, when the registry
# is first built (the first ``distillkit`` command, or the first call of
# ``distillkit.registry.registry()``), with no arguments, once per plugin that
# implements it (collect-all).  Each returns a list (or tuple) of components,
# or None for none; anything else, or a component of the wrong type, stops
# start-up with an error naming the plugin.


@hookspec
def distillkit_register_methods() -> list[Method]:
    """Register distillation methods.

    :return: :class:`~distillkit.api.Method` objects.  A method names its
        source and teacher adapter, lists its stages (each a loss function
        ``loss(run, batch)`` over the :class:`~distillkit.api.StepContext`),
        and declares its options dataclass, which a recipe's
        ``[methods.NAME]`` section sets and which is validated when the run
        is assembled, before any model loads.

    The method is then ``distillkit train --method NAME``.
    """


@hookspec
def distillkit_register_sources() -> list[SourceFactory]:
    """Register pseudo-target sources: where the training sequences come from.

    :return: :class:`~distillkit.api.SourceFactory` objects.  The trainer
        calls ``build(run, **method.source_options(options))`` once per run;
        the result is called with each micro-batch's dataset examples (a list
        of :class:`~distillkit.api.TokenizedExample`) and returns the
        teacher-forcing :class:`~distillkit.api.TrainBatch` ``[x ‖ y]``
        (e.g. the dataset response, or ``y`` sampled from the student).  A
        source with state (a buffer) also defines ``state_dict()`` /
        ``load_state_dict(state)`` and is checkpointed with the run.
    """


@hookspec
def distillkit_register_teacher_adapters() -> list[TeacherAdapterFactory]:
    """Register teacher adapters: how the teacher model is used in a run.

    :return: :class:`~distillkit.api.TeacherAdapterFactory` objects.  The
        trainer calls ``build(teacher_model, run, **method.teacher_adapter_options(options))``
        once per run, after placing the frozen teacher on its device; the
        result (a :class:`~distillkit.api.TeacherAdapter`) gives teacher
        logits aligned with the student's and may own trainable parameters
        (a soft prompt, LoRA), which a stage with ``trains="teacher_adapter"``
        updates.  The teacher's own weights never train.
    """


@hookspec
def distillkit_register_divergences() -> list[Divergence]:
    """Register token-level divergences between a trainable and a target distribution.

    :return: :class:`~distillkit.api.Divergence` objects: a per-row function
        of fp32 log-probabilities ``(N, V) -> (N,)`` in nats, with its
        parameters' defaults.  Losses call them by name through
        ``run.divergence(name, trainable_logits, target_logits, batch)``;
        masking, chunking and averaging are the core's.
    """


@hookspec
def distillkit_register_schedules() -> list[Schedule]:
    """Register coefficient schedules.

    :return: :class:`~distillkit.api.Schedule` objects: ``value(k, K,
        **params) -> float`` for the optimizer step k = 1..K being taken.
        Losses call them by name through ``run.schedule(name)``.  A schedule
        with state also gives ``initial_state(**params)`` and ``update(state,
        k, K, logs, **params)``, which the trainer calls after each optimizer
        step with the step's logged values; the run checkpoints the state.
    """


@hookspec
def distillkit_register_alignments() -> list[VocabularyAlignment]:
    """Register vocabulary alignments: how a teacher with its own tokenizer is compared with the student.

    :return: :class:`~distillkit.api.VocabularyAlignment` objects.  A recipe picks one with
        ``[teacher_signal] alignment = NAME``; the pipeline calls ``build(teacher_tokenizer,
        student_tokenizer)`` once per run, and ``run.teacher_signal(batch)`` then gives the teacher's
        signal over the student's vocabulary (a :class:`~distillkit.api.TopKSignal` with ``valid``).
    """


@hookspec
def distillkit_register_generation_backends() -> list[GenerationBackend]:
    """Register sampler implementations.

    :return: :class:`~distillkit.api.GenerationBackend` objects.  A recipe picks one with
        ``[generation] backend = NAME``; every sample of a run (``run.sample``) and of an evaluation is
        drawn through it.
    """


@hookspec
def distillkit_register_data_formats() -> list[DataFormat]:
    """Register row formats of data files.

    :return: :class:`~distillkit.api.DataFormat` objects: ``to_example(row,
        origin)`` maps one raw row (a dict from JSONL, JSON or parquet) to an
        :class:`~distillkit.api.InstructionExample` (or a list of them),
        raising ``ValueError`` with a one-line reason for a malformed row.
        ``data.format = "auto"`` picks the format whose ``fields`` a row has.
    """


@hookspec
def distillkit_register_datasets() -> list[DatasetSpec]:
    """Register named datasets (``data.dataset = NAME``, ``distillkit eval --data NAME``).

    :return: :class:`~distillkit.api.DatasetSpec` objects: where each split's
        files live (a hub id or a folder under ``$DISTILLKIT_DATA_DIR``) and
        which row format they use.
    """


@hookspec
def distillkit_register_recipe_dirs() -> list[Path]:
    """Register folders of recipes.

    :return: folders holding recipe files ``NAME.toml`` (``--recipe NAME``),
        and optionally ``accelerate/*.yaml`` launch configs and
        ``model_configs/*.json`` snapshots for the memory planner.  Later
        folders win on equal names.
    """
