"""Recipe files: finding them (shipped and plugin-provided folders), TOML,
``extends`` (tables merged key by key) and ``--set`` overrides (``key=value``
sets a key, ``key={...}`` replaces a whole table, ``~key`` removes a key)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import tomllib

from distillkit.config.assembly import resolve_section
from distillkit.config.schema import Recipe, TrainingConfig, build, merge, option_error
from distillkit.config.trackers import check_trackers
from distillkit.errors import DistillkitError, OptionError, did_you_mean
from distillkit.registry import registry


def recipe_dir_files(pattern: str) -> dict[str, Path]:
    """Files matching ``pattern`` (e.g. ``accelerate/*.yaml``) in the shipped
    and plugin-provided recipe folders, by stem (later folders win)."""
    found: dict[str, Path] = {}
    for folder in registry().recipe_dirs:
        for path in sorted(Path(folder).glob(pattern)):
            found[path.stem] = path
    return found


def recipe_files() -> dict[str, Path]:
    """Shipped and plugin-provided recipes, by name (later folders win)."""
    return recipe_dir_files("*.toml")


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except UnicodeDecodeError as err:
        raise DistillkitError(f"recipe file {path} is not UTF-8 text (byte {err.start}); save it as UTF-8") from None
    except tomllib.TOMLDecodeError as err:
        raise DistillkitError(f"recipe file {path} is not valid TOML: {err}") from None


def find_recipe(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix == ".toml":
        if not path.is_file():
            raise DistillkitError(f"recipe file {path} does not exist")
        return path
    files = recipe_files()
    if name_or_path not in files:
        raise DistillkitError(
            f"unknown recipe '{name_or_path}'{did_you_mean(name_or_path, files)}; "
            f"valid recipes: {', '.join(sorted(files)) or 'none'} (or pass a path to a .toml file)"
        )
    return files[name_or_path]


def load_raw_recipe(name_or_path: str, _seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """The recipe as a plain dict, with ``extends`` resolved."""
    path = find_recipe(name_or_path)
    if str(path) in _seen:
        raise DistillkitError(f"recipe {path} extends itself (cycle: {' -> '.join(_seen)})")
    raw = _read_toml(path)
    raw.setdefault("name", path.stem)
    parent = raw.pop("extends", None)
    if parent is not None:
        try:
            base = load_raw_recipe(parent, (*_seen, str(path)))
        except DistillkitError as err:
            raise DistillkitError(f"{path} extends '{parent}': {err}") from None
        raw = merge(base, raw)
    return raw


def parse_override(assignment: str) -> tuple[list[str], Any]:
    """Parse ``a.b.c=value``; the value is read as TOML (numbers, booleans,
    strings in quotes, lists), else taken as a bare string."""
    key, sep, text = assignment.partition("=")
    if not sep or not key.strip():
        raise DistillkitError(f"--set expects key=value (e.g. training.lr=1e-4), got '{assignment}'")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    return key.strip().split("."), value


def _remove_key(raw: dict[str, Any], removal: str) -> None:
    """Apply ``~a.b.c``: delete that key from ``raw`` (in place)."""
    path = removal[1:].strip()
    if not path or "=" in path:
        raise DistillkitError(f"--set {removal}: ~KEY removes a key and takes no value (e.g. --set '~teacher.config')")
    *tables, last = path.split(".")
    node = raw
    for key in tables:
        node = node.get(key)
        if not isinstance(node, dict):
            raise DistillkitError(f"--set {removal}: the recipe has no table '{key}' there; nothing to remove")
    if last not in node:
        raise DistillkitError(f"--set {removal}: the recipe sets no '{path}'{did_you_mean(last, node)}; "
                              f"keys set there: {', '.join(node) or 'none'}")
    del node[last]


def apply_overrides(raw: dict[str, Any], assignments: list[str]) -> dict[str, Any]:
    """``raw`` (not changed) with the ``--set`` assignments applied in order:
    ``key=value`` sets a key (``key={...}``, an inline table, replaces the
    whole table) and ``~key`` removes one, as in Hydra; e.g. ``--set
    '~teacher.config' --set teacher.path=gpt2`` swaps a built teacher for a
    hub model while keeping the rest of the ``[teacher]`` table."""
    raw = copy.deepcopy(raw)
    for assignment in assignments:
        if assignment.startswith("~"):
            _remove_key(raw, assignment)
            continue
        keys, value = parse_override(assignment)
        node = raw
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise DistillkitError(f"--set {assignment}: '{key}' is a value, not a table")
        node[keys[-1]] = value
    return raw


def load_recipe(name_or_path: str, overrides: list[str] | None = None) -> Recipe:
    """Load, override and validate a recipe."""
    raw = apply_overrides(load_raw_recipe(name_or_path), overrides or [])
    recipe = build(Recipe, raw, "")
    alignment = recipe.teacher_signal.alignment
    if alignment is not None:
        try:
            registry().alignments.require(alignment, "alignment")
        except OptionError as error:
            raise option_error("teacher_signal.alignment", error) from None
    try:
        registry().generation_backends.require(recipe.generation.backend, "backend")
    except OptionError as error:
        raise option_error("generation.backend", error) from None
    reason = registry().generation_backends[recipe.generation.backend].unavailable()
    if reason is not None:
        raise DistillkitError(f"generation.backend = '{recipe.generation.backend}' cannot run here: {reason}")
    check_trackers(recipe.logging.report_to)
    for section in ("teacher", "student"):
        sft = getattr(recipe, section).sft
        if sft is not None:
            build(TrainingConfig, sft, f"{section}.sft")
    methods = registry().methods
    for name in recipe.methods:
        if name not in methods:
            raise DistillkitError(
                f"recipe section 'methods.{name}' names no registered method{did_you_mean(name, methods.names())}; "
                f"registered: {', '.join(methods.names())}"
            )
        resolve_section(recipe, name)  # every method section's values are checked now, not when it first runs
    return recipe


