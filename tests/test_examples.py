"""The example plugin packages under examples/ are installed by the project's setup (Makefile), register
through the ``distillkit`` entry-point group like any third-party plugin, and pass their own tests (run
here, in their own folder and pytest session, so that CI runs them)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .test_layering import _imports

REPO = Path(__file__).resolve().parents[1]
AKL = REPO / "examples" / "distillkit-akl"
# what an example's code may import of distillkit: the plugin API and its shared math (its tests: the API)
ALLOWED = {"src": {"distillkit.api", "distillkit.engine.losses"}, "tests": {"distillkit.api"}}


def test_the_akl_example_is_installed_from_its_folder():
    distribution = importlib.metadata.distribution("distillkit-akl")
    (entry_point,) = [e for e in distribution.entry_points if e.group == "distillkit"]
    assert (entry_point.name, entry_point.value) == ("akl", "distillkit_akl")
    import distillkit_akl

    assert Path(distillkit_akl.__file__).resolve().is_relative_to(AKL), "reinstall it: pip install -e " + str(AKL)


def test_distillkit_lists_akl_from_the_example_package():
    result = subprocess.run([sys.executable, "-m", "distillkit", "methods", "--json"], capture_output=True,
                            text=True, check=True)
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert rows["akl"]["plugin"] == "distillkit-akl:akl"


def test_the_akl_example_passes_its_own_tests():
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"], cwd=AKL,
                            env={**os.environ}, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout, result.stdout[-2000:]


@pytest.mark.parametrize("path", sorted(AKL.glob("*/**/*.py")), ids=lambda path: str(path.relative_to(AKL)))
def test_the_example_imports_only_the_plugin_api(path):
    part = path.relative_to(AKL).parts[0]
    outside = _imports(path, "distillkit_akl") - ALLOWED[part]
    assert not outside, f"{path.relative_to(REPO)} imports {sorted(outside)}; allowed: {sorted(ALLOWED[part])}"
