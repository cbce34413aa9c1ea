"""The package's shape stays as designed: imports run one way between the
layers, there is no import circle, plugins see only the plugin API, and the
core names no built-in component (README, "Layout").

Imports are read from the source (``ast``), function-level imports
included; imports under ``if TYPE_CHECKING:`` are type hints only and are
left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# layer of each unit, low to high: a module may import only its own layer and those below
LAYERS = ["foundation", "api", "registry", "config", "engine", "data", "evaluation", "training", "planning", "tools"]
UNIT_LAYER = {"distillkit": "foundation", "errors": "foundation", "files": "foundation", "api": "api",
              "registry": "registry", "config": "config", "engine": "engine", "data": "data",
              "evaluation": "evaluation", "training": "training", "planning": "planning", "cli": "tools",
              "bench": "tools", "__main__": "tools"}
PLUGIN_UNITS = {"plugins", "builtins"}
# what plugins and built-in components may import: the plugin API and the shared math
PLUGIN_ALLOWED = ("distillkit", "distillkit.api", "distillkit.engine.losses", "distillkit.engine.prefix",
                  "distillkit.engine.alignment", "distillkit.engine.sampling")  # the last: the reference sampler


def _module_files() -> dict[str, Path]:
    """Module name -> file, with plugins/ under its installed name distillkit.plugins."""
    files = {}
    for folder, package in ((ROOT / "distillkit", "distillkit"), (ROOT / "plugins", "distillkit.plugins")):
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            files[".".join([package, *parts])] = path
    return files


MODULES = _module_files()


def _type_checking_block(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imports(path: Path, module: str) -> set[str]:
    """The distillkit modules ``module`` imports at run time (submodules resolved)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if _type_checking_block(child):
                continue
            if isinstance(child, ast.Import):
                found.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative import
                    package = module.split(".")[: len(module.split(".")) - child.level + (path.name == "__init__.py")]
                    base = ".".join(package + ([base] if base else []))
                for alias in child.names:
                    candidate = f"{base}.{alias.name}"
                    found.add(candidate if candidate in MODULES else base)
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return {name for name in found if name == "distillkit" or name.startswith("distillkit.")}


GRAPH = {module: _imports(path, module) for module, path in MODULES.items()}


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "distillkit"


def test_every_module_belongs_to_a_layer():
    unknown = {_unit(m) for m in MODULES} - set(UNIT_LAYER) - PLUGIN_UNITS - {"recipes"}
    assert not unknown, f"add these to a layer in {__file__}: {sorted(unknown)}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _unit(m) in UNIT_LAYER))
def test_imports_run_down_the_layers(module):
    rank = LAYERS.index(UNIT_LAYER[_unit(module)])
    upward = [target for target in GRAPH[module]
              if _unit(target) in UNIT_LAYER and LAYERS.index(UNIT_LAYER[_unit(target)]) > rank]
    plugin_code = [target for target in GRAPH[module] if _unit(target) in PLUGIN_UNITS]
    assert not upward, f"{module} imports a higher layer: {upward}"
    assert not plugin_code, f"{module} imports a plugin or built-in component directly: {plugin_code}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _unit(m) in PLUGIN_UNITS))
def test_plugins_and_builtins_import_only_the_api(module):
    outside = [target for target in GRAPH[module]
               if target not in PLUGIN_ALLOWED and _unit(target) not in PLUGIN_UNITS]
    assert not outside, f"{module} imports {outside}; plugins see only {', '.join(PLUGIN_ALLOWED)}"


def test_no_import_circle():
    # Tarjan's strongly connected components over the module graph
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in GRAPH.get(node, ()):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for module in sorted(GRAPH):
        if module not in index:
            connect(module)
    assert not circles, f"import circles: {circles}"


def test_the_layering_check_catches_an_upward_import(tmp_path):
    """The checker itself: an engine module importing training is found."""
    path = tmp_path / "bad.py"
    path.write_text("from distillkit.training.trainer import Trainer\n")
    imports = _imports(path, "distillkit.engine.bad")
    assert "distillkit.training.trainer" in imports
    assert LAYERS.index(UNIT_LAYER[_unit("distillkit.training.trainer")]) > LAYERS.index(UNIT_LAYER["engine"])


def _string_literals(path: Path) -> set[str]:
    """String constants of a module, without docstrings."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return {node.value for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings}


def test_the_core_names_no_builtin_component():
    """No core module switches on a built-in method, source or teacher adapter
    by name.  Not checked: the source names "dataset", "student" and
    "teacher", which are also the core's words for data and model roles, and
    "sft", also the name of the core's preparation step (``[teacher.sft]``,
    ``student_init = "sft"``: supervised fine-tuning by the registered method
    of that name)."""
    from distillkit.registry import registry

    reg = registry()
    builtin = {name for category in (reg.methods, reg.sources, reg.teacher_adapters) for name in category.names()
               if category.entry(name).plugin.startswith("distillkit:")}
    names = builtin - {"dataset", "student", "teacher", "sft"}
    assert {"promptkd", "minillm", "rollouts", "soft_prompt", "lora"} <= names
    core = [m for m in MODULES if _unit(m) in UNIT_LAYER and m != "distillkit.data.registrations"]
    found = {m: sorted(_string_literals(MODULES[m]) & names) for m in core}
    assert not {m: n for m, n in found.items() if n}
