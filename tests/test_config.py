"""Recipe parsing, overrides and their errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from distillkit.config import TrainingConfig, load_recipe, parse_override, resolve_run
from distillkit.errors import DistillkitError


def test_tiny_recipe_validates_and_resolves():
    recipe = load_recipe("tiny")
    assert recipe.name == "tiny"
    assert recipe.tokenizer.train_vocab_size == 4096
    run = resolve_run(recipe, "kd")
    assert run.options.kd_ratio == 0.5 and run.options.divergence == "forward_kl"
    assert run.training.max_steps == recipe.training.max_steps


def test_override_changes_one_field():
    recipe = load_recipe("tiny", ["training.lr=3e-4", "methods.kd.kd_ratio=0.25", 'data.dataset="vicuna"'])
    assert recipe.training.lr == 3e-4
    assert recipe.data.dataset == "vicuna"
    assert resolve_run(recipe, "kd").options.kd_ratio == 0.25
    assert load_recipe("tiny").training.lr != 3e-4  # the file itself is untouched


@pytest.mark.parametrize(
    ("assignment", "message"),
    [
        ("training.lrr=1e-4", r"unknown key 'training.lrr' \(did you mean 'lr'\?\)"),
        ("trainig.lr=1e-4", r"unknown key 'trainig' \(did you mean 'training'\?\)"),
        ("training.lr=fast", r"'training.lr' must be float, got 'fast'"),
        ("training.select_by=bleu", r"'training.select_by' must be one of 'rougeL', 'loss'"),
        ("methods.kd.kd_ration=0.3", r"unknown key 'methods.kd.kd_ration' \(did you mean 'kd_ratio'\?\)"),
        ("methods.kdd.kd_ratio=0.3", r"'methods.kdd' names no registered method \(did you mean 'kd'\?\)"),
        ("methods.kd.training.epochz=2", r"unknown key 'methods.kd.training.epochz' \(did you mean 'epochs'\?\)"),
        ("teacher.sft.lr=x", r"'teacher.sft.lr' must be float"),
        ("lr", r"--set expects key=value"),
        ("~teacher.confg", r"--set ~teacher.confg: the recipe sets no 'teacher.confg' \(did you mean 'config'\?\); "
                           r"keys set there: config, init_seed, sft"),
        ("~teacher.config=1", r"~KEY removes a key and takes no value"),
        ("~teacher.config.n_layer.x", r"the recipe has no table 'n_layer' there"),
        ("~teacher.dtype", r"the recipe sets no 'teacher.dtype'"),  # a default, not set by the recipe
        ("data.prompt=fields", r"'data.prompt' must be one of 'template', 'field', got 'fields'"),
        ("data.long_prompts=truncate", r"'data.long_prompts' must be one of 'drop', 'cut_left', got 'truncate'"),
        ("generation.no_repeat_ngram_size=-1", r"'generation.no_repeat_ngram_size' must be >= 0 \(0: off\)"),
    ],
)
def test_bad_overrides_are_one_line_errors(assignment, message):
    with pytest.raises(DistillkitError, match=message) as info:
        recipe = load_recipe("tiny", [assignment])
        resolve_run(recipe, "kd")
    assert "\n" not in str(info.value)


def test_an_inline_table_replaces_the_whole_table():
    """teacher.config -> teacher.path in one --set: the [teacher] table is replaced, not merged."""
    recipe = load_recipe("tiny", ['teacher={path="gpt2", init_seed=4}'])
    assert (recipe.teacher.path, recipe.teacher.config, recipe.teacher.init_seed) == ("gpt2", None, 4)
    assert recipe.teacher.sft is None  # the file's [teacher.sft] went with its table
    assert recipe.student == load_recipe("tiny").student


def test_tilde_removes_one_key_and_overrides_apply_in_order():
    tiny = load_recipe("tiny")
    recipe = load_recipe("tiny", ["~teacher.config", 'teacher.path="gpt2"'])
    assert (recipe.teacher.path, recipe.teacher.config) == ("gpt2", None)
    assert (recipe.teacher.init_seed, recipe.teacher.sft) == (tiny.teacher.init_seed, tiny.teacher.sft)  # kept
    assert load_recipe("tiny", ["~training.lr"]).training.lr == TrainingConfig().lr  # back to the default
    # a later --set wins: removed, then set again
    assert load_recipe("tiny", ["~teacher.init_seed", "teacher.init_seed=9"]).teacher.init_seed == 9
    with pytest.raises(DistillkitError, match="the recipe sets no 'teacher.init_seed'"):
        load_recipe("tiny", ["teacher.init_seed=9", "~teacher.init_seed", "~teacher.init_seed"])


def test_override_values_are_typed():
    assert parse_override("eval.seeds=[1, 2]") == (["eval", "seeds"], [1, 2])
    assert parse_override("data.dataset=my/hub-id") == (["data", "dataset"], "my/hub-id")
    assert parse_override("training.max_steps=5") == (["training", "max_steps"], 5)


def test_unknown_recipe_lists_valid_names():
    with pytest.raises(DistillkitError, match=r"unknown recipe 'tinyy' \(did you mean 'tiny'\?\); valid recipes: .*tiny"):
        load_recipe("tinyy")


def test_extends_merges_tables(tmp_path: Path):
    child = tmp_path / "child.toml"
    child.write_text('extends = "tiny"\n[training]\nlr = 0.5\n')
    recipe = load_recipe(str(child))
    assert recipe.name == "child"
    assert recipe.training.lr == 0.5
    assert recipe.training.batch_size == load_recipe("tiny").training.batch_size


def test_recipe_file_errors(tmp_path: Path):
    broken = tmp_path / "broken.toml"
    broken.write_text("[training\nlr = 1")
    with pytest.raises(DistillkitError, match="is not valid TOML"):
        load_recipe(str(broken))
    with pytest.raises(DistillkitError, match="does not exist"):
        load_recipe(str(tmp_path / "missing.toml"))
    looping = tmp_path / "loop.toml"
    looping.write_text(f'extends = "{looping}"\n')
    with pytest.raises(DistillkitError, match="extends itself"):
        load_recipe(str(looping))


def test_student_init_is_validated():
    with pytest.raises(DistillkitError, match="student_init' must be 'pretrained' or 'sft'"):
        resolve_run(load_recipe("tiny", ["methods.kd.student_init=sfd"]), "kd")
    assert resolve_run(load_recipe("tiny", ["methods.kd.student_init=sft"]), "kd").student_init == "sft"
