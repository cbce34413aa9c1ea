"""The README's plugin example is real: the ``my_package/tvd_kd.py`` block of
"Writing a plugin", loaded as a third-party plugin, trains on the test recipe
and its option check stops a bad value before any model loads."""

from __future__ import annotations

import json
import math
import re
import sys
import types

import pytest
from typer.testing import CliRunner

from distillkit.cli import app

from .conftest import REPO, plugins_installed


def _readme_example(monkeypatch) -> types.ModuleType:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n# my_package/tvd_kd\.py\n(.*?)```", text, flags=re.S)
    assert len(blocks) == 1, "README: expected one ```python block starting with '# my_package/tvd_kd.py'"
    module = types.ModuleType("readme_tvd_kd")
    monkeypatch.setitem(sys.modules, module.__name__, module)  # dataclasses look their module up there
    exec(compile(blocks[0], "README.md:tvd_kd", "exec"), module.__dict__)  # noqa: S102 - our own README
    return module


@pytest.fixture
def readme_plugin(monkeypatch):
    with plugins_installed(monkeypatch, {"readme": _readme_example(monkeypatch)}):
        yield


def test_the_readme_plugin_trains(readme_plugin, recipe_file, tmp_path):
    output = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--method", "tvd-kd", "--recipe", str(recipe_file()), "--output",
                                      str(output), "--max-steps", "4", "--set", "methods.tvd-kd.kd_ratio=0.3"])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    assert {"ce", "div"} <= records[0].keys()
    assert json.loads((output / "run.json").read_text())["options"] == {"kd_ratio": 0.3, "divergence": "tvd"}


@pytest.mark.parametrize(("setting", "message"), [
    ("methods.tvd-kd.kd_ratio=2", "'methods.tvd-kd.kd_ratio' must be in [0, 1], got 2.0"),
    ("methods.tvd-kd.divergence=tv", "must name a registered divergence"),
])
def test_the_readme_plugin_options_are_checked_at_assembly(readme_plugin, recipe_file, monkeypatch, setting,
                                                           message):
    from .test_faults import _one_line_error

    recipe = recipe_file()
    line = _one_line_error(["train", "--method", "tvd-kd", "--recipe", str(recipe), "--output",
                            str(recipe.parent / "out"), "--set", setting], monkeypatch)
    assert message in line
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    if "kd_ratio=2" in setting:  # the README quotes this error
        assert line.removeprefix("error: ") in " ".join(readme.split())
