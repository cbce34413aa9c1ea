"""Assembling a run: a recipe combined with one registered method's section
into validated options and training settings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from distillkit.config.schema import Recipe, TrainingConfig, build, merge, to_dict
from distillkit.errors import DistillkitError
from distillkit.registry import registry


@dataclass
class RunConfig:
    """Everything one ``train`` run needs: the recipe, the method, its
    validated options and the training settings after method overrides."""

    recipe: Recipe
    method: str
    options: Any
    training: TrainingConfig
    student_init: Literal["pretrained", "sft"] = "pretrained"


def resolve_run(recipe: Recipe, method_name: str) -> RunConfig:
    """Combine the recipe with one method's ``[methods.NAME]`` section."""
    method = registry().methods[method_name]
    section = dict(recipe.methods.get(method_name, {}))
    training_overrides = section.pop("training", {})
    student_init = section.pop("student_init", method.student_init)
    if student_init not in ("pretrained", "sft"):
        raise DistillkitError(f"'methods.{method_name}.student_init' must be 'pretrained' or 'sft', got {student_init!r}")
    options = build(method.options, section, f"methods.{method_name}")
    training = build(TrainingConfig, merge(to_dict(recipe.training), training_overrides),
                     f"methods.{method_name}.training")
    return RunConfig(recipe=recipe, method=method_name, options=options, training=training,
                     student_init=student_init)
