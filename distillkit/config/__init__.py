"""Recipes and runs: the schema, recipe files, and assembling a run."""

from distillkit.config.assembly import RunConfig, resolve_run
from distillkit.config.recipes import (
    apply_overrides,
    find_recipe,
    load_raw_recipe,
    load_recipe,
    parse_override,
    recipe_dir_files,
    recipe_files,
)
from distillkit.config.schema import (
    DataConfig,
    EvalConfig,
    GenerationConfig,
    LoggingConfig,
    ModelConfig,
    Recipe,
    TokenizerConfig,
    TrainingConfig,
    build,
    merge,
    to_dict,
)

__all__ = ["DataConfig", "EvalConfig", "GenerationConfig", "LoggingConfig", "ModelConfig", "Recipe", "RunConfig",
           "TokenizerConfig", "TrainingConfig", "apply_overrides", "build", "find_recipe", "load_raw_recipe",
           "load_recipe", "merge", "parse_override", "recipe_dir_files", "recipe_files", "resolve_run", "to_dict"]
