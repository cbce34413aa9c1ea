"""Assembling a run: a recipe combined with one registered method's section
into validated options and training settings, and the options of the
method's source and teacher adapter built from them.

Loading a recipe checks every method section's values
(:func:`resolve_section`); assembling the run of one method
(:func:`resolve_run`) also checks how the method's components and models
fit the rest of the recipe.  Both happen before any model loads.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from distillkit.api import SourceFactory, TeacherAdapterFactory
from distillkit.config.schema import ModelConfig, Recipe, TrainingConfig, build, merge, option_error, to_dict
from distillkit.errors import DistillkitError, OptionError
from distillkit.registry import registry

ComponentRole = Literal["source", "teacher_adapter"]


@dataclass
class RunConfig:
    """Everything one ``train`` run needs: the recipe, the method, its
    validated options and the training settings after method overrides."""

    recipe: Recipe
    method: str
    options: Any
    training: TrainingConfig
    student_init: Literal["pretrained", "sft"] = "pretrained"


def check_model_spec(spec: ModelConfig, role: str) -> None:
    """Raise unless ``spec`` describes one ``role`` ("teacher"/"student")
    model: exactly one of ``path``, ``config`` and ``init_from`` (the
    student's only), ``num_layers`` only with ``init_from``, ``gguf_file``
    only with ``path``."""
    if spec.init_from is not None and role != "student":
        raise DistillkitError(f"'{role}.init_from' is for the student only (a student cut from the teacher)")
    if [spec.path, spec.config, spec.init_from].count(None) != 2:
        raise DistillkitError(f"{role}: set exactly one of '{role}.path' (a model), '{role}.config' (build one) "
                              f"or '{role}.init_from' (\"teacher\": cut from the teacher)")
    if spec.num_layers is not None and spec.init_from is None:
        raise DistillkitError(f"'{role}.num_layers' only applies with {role}.init_from = \"teacher\"")
    if spec.gguf_file is not None and spec.path is None:
        raise DistillkitError(f"'{role}.gguf_file' needs '{role}.path', the folder (or package:NAME) that holds it")


def _category(name: str) -> Any:
    """The registry's category ``name`` (for options naming registered components)."""
    return getattr(registry(), name)


def _recipe_keys(method_name: str, passed: Callable[[Any], dict[str, Any]], options: Any) -> dict[str, str]:
    """The recipe key of each component option that the method's mapping
    ``passed`` sets from one of its options unchanged (MiniLLM's rollouts:
    ``{"size": "methods.minillm.rollout_size", ...}``), found by applying
    the mapping to a stand-in whose attributes are their own names; an
    option computed from the values is left out."""
    names = types.SimpleNamespace(**{f.name: f.name for f in dataclasses.fields(options)})
    try:
        given = passed(names)
    except Exception:  # the mapping computes with the values: no names to report
        return {}
    return {option: f"methods.{method_name}.{value}" for option, value in given.items()
            if isinstance(value, str) and hasattr(names, value)}


@dataclass(frozen=True)
class Component:
    """A method's source or teacher adapter: its factory, its built options
    and the recipe key of each option the method sets."""

    factory: SourceFactory | TeacherAdapterFactory
    options: Any
    keys: dict[str, str]

    def check(self, config: RunConfig) -> None:
        """The factory's check against the rest of the run, its errors naming the recipe key."""
        if self.factory.check is None:
            return
        try:
            self.factory.check(config, self.options)
        except OptionError as error:
            raise option_error(self.keys.get(error.field) or f"methods.{config.method}.{error.field}", error) from None


def component(config: RunConfig, role: ComponentRole) -> Component | None:
    """The method's source or teacher adapter (None: the method uses no
    teacher) with its options built from ``method.source_options`` /
    ``method.teacher_adapter_options`` and checked by their dataclass."""
    method = registry().methods[config.method]
    if role == "source":
        name, passed, factories = method.source, method.source_options, registry().sources
    else:
        name, passed, factories = method.teacher_adapter, method.teacher_adapter_options, registry().teacher_adapters
    if name is None:
        return None
    factory = factories[name]
    keys = _recipe_keys(config.method, passed, config.options)
    options = build(factory.options, passed(config.options), f"methods.{config.method}", keys, registered=_category)
    return Component(factory, options, keys)


def _assemble(recipe: Recipe, method_name: str) -> tuple[RunConfig, list[Component]]:
    method = registry().methods[method_name]
    section = dict(recipe.methods.get(method_name, {}))
    training_overrides = section.pop("training", {})
    student_init = section.pop("student_init", method.student_init)
    if student_init not in ("pretrained", "sft"):
        raise DistillkitError(f"'methods.{method_name}.student_init' must be 'pretrained' or 'sft', got {student_init!r}")
    options = build(method.options, section, f"methods.{method_name}", registered=_category)
    training = build(TrainingConfig, merge(to_dict(recipe.training), training_overrides),
                     f"methods.{method_name}.training")
    config = RunConfig(recipe=recipe, method=method_name, options=options, training=training,
                       student_init=student_init)
    parts = [component(config, "source"), component(config, "teacher_adapter")]
    return config, [part for part in parts if part is not None]


def resolve_section(recipe: Recipe, method_name: str) -> RunConfig:
    """Combine the recipe with one method's ``[methods.NAME]`` section,
    checking its values and those it passes to its source and teacher
    adapter (what loading a recipe checks for every section)."""
    return _assemble(recipe, method_name)[0]


def resolve_run(recipe: Recipe, method_name: str) -> RunConfig:
    """The run of ``method_name`` on ``recipe``: :func:`resolve_section`,
    then the specs of the models it uses and its source's and teacher
    adapter's checks against the rest of the run."""
    config, parts = _assemble(recipe, method_name)
    check_model_spec(recipe.student, "student")
    if registry().methods[method_name].teacher_adapter is not None or recipe.student.init_from is not None:
        check_model_spec(recipe.teacher, "teacher")
    for part in parts:
        part.check(config)
    check_teacher_signal(config)
    return config


def check_teacher_signal(config: RunConfig) -> None:
    """A top-k teacher signal needs a method that reads the teacher through
    ``run.teacher_signal`` (a method without a teacher has nothing to
    replace).  Cached (no alignment): a source whose sequences are fixed.
    With an alignment (computed online): no ``teacher.sft``."""
    method = registry().methods[config.method]
    signal = config.recipe.teacher_signal
    if signal.top_k == 0 or method.teacher_adapter is None:
        return
    if signal.alignment is not None:
        if not method.reads_teacher_signal:
            raise DistillkitError(f"method '{method.name}' reads the teacher's dense logits (it does not declare "
                                  "reads_teacher_signal), so it cannot pair a teacher with another tokenizer "
                                  f"(teacher_signal.alignment = '{signal.alignment}'); use a teacher that shares "
                                  "the student's tokenizer, or a method that declares it")
        if config.recipe.teacher.sft is not None:
            raise DistillkitError("teacher.sft is not supported with teacher_signal.alignment yet (its data pipeline "
                                  "would need the teacher's tokens); fine-tune the teacher beforehand and set "
                                  "teacher.path, or remove it with --set '~teacher.sft'")
        return
    off = "or set teacher_signal.top_k = 0 (the online teacher)"
    if not method.reads_teacher_signal:
        raise DistillkitError(f"method '{method.name}' reads the teacher's dense logits (it does not declare "
                              f"reads_teacher_signal), so it cannot use a top-k teacher signal; {off}")
    if registry().sources[method.source].fixed_view is None:
        raise DistillkitError(f"method '{method.name}' trains on sequences its source '{method.source}' makes during "
                              f"training, so no teacher signal can be computed ahead; {off}")
