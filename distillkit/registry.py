"""The plugin manager and the merged registry of named components.

Every plugin, built-in or third-party, is loaded from the entry-point group
``distillkit``.  Each registration hook implementation is called separately
so that the registry knows which plugin provided which name, and a name
registered twice is reported with both plugins.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Generic, TypeVar

import pluggy

from distillkit.api import hookspecs
from distillkit.api.components import (
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
from distillkit.errors import DistillkitError, OptionError, did_you_mean

ENTRY_POINT_GROUP = "distillkit"

T = TypeVar("T")


class PluginError(DistillkitError):
    """A plugin failed to load or registered something invalid."""


@dataclass(frozen=True)
class Entry(Generic[T]):
    """A registered component and the plugin that registered it."""

    item: T
    plugin: str


class Category(Generic[T]):
    """Named components of one kind, with clear errors for unknown names."""

    def __init__(self, kind: str, expected: type) -> None:
        self.kind = kind
        self.expected = expected
        self.entries: dict[str, Entry[T]] = {}

    def add(self, item: T, plugin: str) -> None:
        if not isinstance(item, self.expected):
            raise PluginError(
                f"plugin '{plugin}' registered {item!r} as a {self.kind}; "
                f"expected a distillkit.api.{self.expected.__name__}"
            )
        name = item.name  # type: ignore[attr-defined]
        if name in self.entries:
            raise PluginError(
                f"{self.kind} '{name}' is registered by two plugins: "
                f"'{self.entries[name].plugin}' and '{plugin}'; uninstall or rename one of them"
            )
        self.entries[name] = Entry(item, plugin)

    def __getitem__(self, name: str) -> T:
        return self.entry(name).item

    def entry(self, name: str) -> Entry[T]:
        if name not in self.entries:
            valid = ", ".join(sorted(self.entries)) or "none"
            raise DistillkitError(
                f"unknown {self.kind} '{name}'{did_you_mean(name, self.entries)}; valid names: {valid}"
            )
        return self.entries[name]

    def __contains__(self, name: object) -> bool:
        return name in self.entries

    def names(self) -> list[str]:
        return sorted(self.entries)

    def require(self, name: str, field: str) -> None:
        """For an options check: raise :class:`OptionError` unless ``name`` is registered here."""
        if name not in self.entries:
            raise OptionError(field, f"must name a registered {self.kind} ({', '.join(sorted(self.entries))}), "
                                     f"got {name!r}{did_you_mean(name, self.entries)}")


class PluginManager(pluggy.PluginManager):
    """distillkit's pluggy plugin manager, which remembers the distribution
    each entry-point plugin came from (``distributions``: plugin name ->
    distribution name) for the ``distribution:plugin`` labels.

    Entry points are read with ``importlib.metadata`` here rather than by
    pluggy's ``load_setuptools_entrypoints``, whose distribution records
    (``list_plugin_distinfo``) are a pkg_resources compatibility facade."""

    def __init__(self) -> None:
        super().__init__(ENTRY_POINT_GROUP)
        self.add_hookspecs(hookspecs)
        self.distributions: dict[str, str] = {}

    def load_entry_points(self) -> None:
        """Register every plugin of the entry-point group, in the order
        ``importlib.metadata`` lists them, skipping names already registered
        or blocked (as pluggy's ``load_setuptools_entrypoints`` does)."""
        for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            if self.has_plugin(entry_point.name) or self.is_blocked(entry_point.name):
                continue
            self.register(entry_point.load(), name=entry_point.name)
            self.distributions[entry_point.name] = entry_point.dist.name


class Registry:
    """All components registered by the loaded plugins."""

    def __init__(self, pm: PluginManager) -> None:
        self.plugin_manager = pm
        self.methods: Category[Method] = Category("method", Method)
        self.sources: Category[SourceFactory] = Category("pseudo-target source", SourceFactory)
        self.teacher_adapters: Category[TeacherAdapterFactory] = Category(
            "teacher adapter", TeacherAdapterFactory
        )
        self.divergences: Category[Divergence] = Category("divergence", Divergence)
        self.schedules: Category[Schedule] = Category("schedule", Schedule)
        self.alignments: Category[VocabularyAlignment] = Category("vocabulary alignment", VocabularyAlignment)
        self.generation_backends: Category[GenerationBackend] = Category("generation backend", GenerationBackend)
        self.data_formats: Category[DataFormat] = Category("data format", DataFormat)
        self.datasets: Category[DatasetSpec] = Category("dataset", DatasetSpec)
        self.recipe_dirs: list[Path] = []
        self._collect()

    def _collect(self) -> None:
        categories = {
            "distillkit_register_methods": self.methods,
            "distillkit_register_sources": self.sources,
            "distillkit_register_teacher_adapters": self.teacher_adapters,
            "distillkit_register_divergences": self.divergences,
            "distillkit_register_schedules": self.schedules,
            "distillkit_register_alignments": self.alignments,
            "distillkit_register_generation_backends": self.generation_backends,
            "distillkit_register_data_formats": self.data_formats,
            "distillkit_register_datasets": self.datasets,
        }
        for hook_name, category in categories.items():
            for plugin, items in self._call_each(hook_name):
                for item in items:
                    category.add(item, plugin)
        for _plugin, dirs in self._call_each("distillkit_register_recipe_dirs"):
            self.recipe_dirs.extend(Path(d) for d in dirs)

    def _label(self, plugin_name: str) -> str:
        """``distribution:plugin`` for entry-point plugins, else the plugin name."""
        distribution = self.plugin_manager.distributions.get(plugin_name)
        return plugin_name if distribution is None else f"{distribution}:{plugin_name}"

    def _call_each(self, hook_name: str) -> list[tuple[str, list[Any]]]:
        """Call every implementation of a registration hook, in registration order."""
        results = []
        caller = getattr(self.plugin_manager.hook, hook_name)
        for impl in caller.get_hookimpls():
            label = self._label(impl.plugin_name)
            items = impl.function()
            if items is None:
                continue
            if not isinstance(items, (list, tuple)):
                raise PluginError(f"plugin '{label}': {hook_name} must return a list, got {items!r}")
            results.append((label, list(items)))
        return results


def make_plugin_manager(extra_plugins: dict[str, Any] | None = None) -> PluginManager:
    """Load every plugin of the entry-point group (and ``extra_plugins``, by
    name), failing with a clear message on a malformed plugin."""
    pm = PluginManager()
    try:
        pm.load_entry_points()
        for name, plugin in (extra_plugins or {}).items():
            pm.register(plugin, name=name)
        pm.check_pending()
    except pluggy.PluginValidationError as err:
        raise PluginError(
            f"plugin '{getattr(err.plugin, '__name__', err.plugin)}' does not match "
            f"distillkit's hook specifications: {err}; see distillkit/api/hookspecs.py for the expected signatures"
        ) from err
    if not pm.get_plugins():
        raise PluginError(
            "no distillkit plugins found: the package's entry points are missing; reinstall with `pip install -e .`"
        )
    return pm


@cache
def registry() -> Registry:
    """The process-wide registry of all installed plugins (built lazily once)."""
    return Registry(make_plugin_manager())
