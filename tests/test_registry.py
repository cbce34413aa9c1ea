"""Plugin registration: built-ins through the entry-point group, a third-party
package installed in the test, duplicate names and malformed plugins."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from distillkit import hookimpl
from distillkit.api import Method, Stage
from distillkit.errors import DistillkitError
from distillkit.registry import PluginError, PluginManager, Registry, make_plugin_manager, registry

BUILTIN_METHODS = {"sft", "kd", "seqkd", "gkd", "promptkd", "minillm"}


def test_builtins_register_through_entry_points():
    reg = registry()
    assert BUILTIN_METHODS <= set(reg.methods.names())
    # built-ins carry their distribution name, exactly like third-party entry points
    assert reg.methods.entry("kd").plugin == "distillkit:kd"
    assert {"forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"} <= set(
        reg.divergences.names())
    assert {"constant", "linear", "cosine", "step"} <= set(reg.schedules.names())
    assert "dataset" in reg.sources and "frozen" in reg.teacher_adapters
    assert {"dolly", "minillm"} <= set(reg.data_formats.names())
    assert any((d / "tiny.toml").is_file() for d in reg.recipe_dirs)


def test_entry_points_skip_blocked_and_already_registered_names():
    """The loader registers each entry point under its name, labelled with its distribution, and
    leaves out a blocked name or one already taken (as pluggy's own loader does)."""
    pm = PluginManager()
    pm.set_blocked("seqkd")
    impostor = _MethodPlugin("not-kd")
    pm.register(impostor, name="kd")
    pm.load_entry_points()
    assert pm.get_plugin("kd") is impostor and "kd" not in pm.distributions
    assert pm.get_plugin("seqkd") is None and "seqkd" not in pm.distributions
    assert pm.distributions["sft"] == "distillkit" and pm.get_plugin("sft").__name__ == "distillkit.plugins.sft"
    methods = Registry(pm).methods
    assert "seqkd" not in methods and "kd" not in methods
    assert (methods.entry("not-kd").plugin, methods.entry("sft").plugin) == ("kd", "distillkit:sft")


def test_unknown_method_lists_valid_names_and_suggests():
    with pytest.raises(DistillkitError, match=r"unknown method 'kdd' \(did you mean 'kd'\?\); valid names: ") as info:
        registry().methods["kdd"]
    assert str(info.value).endswith(", ".join(registry().methods.names()))


class _MethodPlugin:
    def __init__(self, name: str) -> None:
        self.name = name

    @hookimpl
    def distillkit_register_methods(self):
        return [Method(self.name, "test", stages=(Stage("student", lambda run, batch: {}),), source="dataset",
                       teacher_adapter=None)]


def test_duplicate_method_names_both_plugins():
    pm = make_plugin_manager({"alpha": _MethodPlugin("twin"), "beta": _MethodPlugin("twin")})
    with pytest.raises(PluginError, match="method 'twin' is registered by two plugins: 'alpha' and 'beta'"):
        Registry(pm)


def test_builtin_name_clash_names_the_builtin():
    with pytest.raises(PluginError, match="'distillkit:kd' and 'impostor'"):
        Registry(make_plugin_manager({"impostor": _MethodPlugin("kd")}))


class _WrongSignature:
    @hookimpl
    def distillkit_register_methods(self, config):  # the spec takes no arguments
        return []


class _TypoHook:
    @hookimpl
    def distillkit_register_method(self):  # missing "s"
        return []


@pytest.mark.parametrize("plugin", [_WrongSignature(), _TypoHook()])
def test_malformed_plugin_fails_at_startup(plugin):
    with pytest.raises(PluginError, match="does not match distillkit's hook specifications"):
        make_plugin_manager({"broken": plugin})


def test_registering_a_non_component_is_rejected():
    class Bad:
        @hookimpl
        def distillkit_register_divergences(self):
            return ["not a divergence"]

    with pytest.raises(PluginError, match="expected a distillkit.api.Divergence"):
        Registry(make_plugin_manager({"bad": Bad()}))


PLUGIN_PACKAGE = {
    "pyproject.toml": """
        [build-system]
        requires = ["setuptools"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "distillkit-tvd-plugin"
        version = "0.1"
        [project.entry-points.distillkit]
        tvd_kd = "distillkit_tvd_plugin"
    """,
    "distillkit_tvd_plugin.py": '''
        """A third-party method: KD with total variation instead of forward KL."""
        from dataclasses import dataclass

        from distillkit import hookimpl
        from distillkit.api import Method, Stage
        from distillkit.errors import require

        @dataclass(frozen=True)
        class TVDOptions:
            weight: float = 1.0

            def __post_init__(self):
                require(self.weight > 0, "weight", "be > 0", self.weight)

        def tvd_loss(run, batch):
            student = run.student_logits(batch)
            tvd = run.options.weight * run.divergence("tvd", student, run.teacher_logits(batch), batch)
            return {"loss": tvd, "tvd": tvd}

        @hookimpl
        def distillkit_register_methods():
            return [Method("tvd-kd", "KD with total variation distance", stages=(Stage("student", tvd_loss),),
                           source="dataset", teacher_adapter="frozen",
                           options=TVDOptions)]
    ''',
}


def test_third_party_package_appears_without_editing_distillkit(tmp_path: Path):
    source, site = tmp_path / "src", tmp_path / "site"
    source.mkdir()
    for name, text in PLUGIN_PACKAGE.items():
        (source / name).write_text(textwrap.dedent(text))
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(site), str(source)], check=True, capture_output=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-m", "distillkit", "methods", "--json"], env=env, check=True,
                         capture_output=True, text=True).stdout
    methods = {row["name"]: row for row in json.loads(out)}
    assert methods["tvd-kd"]["plugin"] == "distillkit-tvd-plugin:tvd_kd"
    assert BUILTIN_METHODS <= set(methods)
    # its own option check runs when the recipe is assembled, before any model is loaded, as for built-ins
    bad = subprocess.run([sys.executable, "-m", "distillkit", "train", "--method", "tvd-kd", "--recipe", "tiny",
                          "--output", str(tmp_path / "run"), "--set", "methods.tvd-kd.weight=-1"], env=env,
                         capture_output=True, text=True)
    assert bad.returncode == 2
    assert [line for line in bad.stderr.splitlines() if line.startswith("error:")] == [
        "error: 'methods.tvd-kd.weight' must be > 0, got -1.0; change it in the recipe or with --set "
        "methods.tvd-kd.weight=..."]
    assert not (tmp_path / "run").exists()
