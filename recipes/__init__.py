"""The recipe files shipped with distillkit (a plugin registering this folder)."""

from pathlib import Path

from distillkit import hookimpl


@hookimpl
def distillkit_register_recipe_dirs() -> list[Path]:
    return [Path(__file__).resolve().parent]
