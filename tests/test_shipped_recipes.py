"""The shipped recipes: every one validates and resolves, and the paper's
recipes carry the paper's settings (PromptKD paper §4.1 and appendix A, the
reference scripts, docs/fidelity.md)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from distillkit.cli import app
from distillkit.config import TrainingConfig, build, load_raw_recipe, load_recipe, recipe_files, resolve_run, to_dict

PAPER_RECIPES = {
    # name: (teacher, student, batch size, PromptKD lr, PromptKD epochs)
    "gpt2-xl_to_gpt2-base": ("gpt2-xl", "gpt2", 32, 5e-5, 20),
    "gpt2-xl_to_gpt2-medium": ("gpt2-xl", "gpt2-medium", 8, 1e-5, 20),
    "gpt2-xl_to_gpt2-large": ("gpt2-xl", "gpt2-large", 8, 5e-6, 15),
    "opt13b_to_1.3b": ("facebook/opt-13b", "facebook/opt-1.3b", 64, 5e-6, 10),
    "opt13b_to_2.7b": ("facebook/opt-13b", "facebook/opt-2.7b", 64, 5e-6, 10),
    "opt13b_to_6.7b": ("facebook/opt-13b", "facebook/opt-6.7b", 64, 5e-6, 10),
    "llama13b_to_7b": ("huggyllama/llama-13b", "huggyllama/llama-7b", 64, 5e-6, 10),
}
CHILDREN = {
    "gpt2-xl_to_gpt2-medium": "gpt2-xl_to_gpt2-base",
    "gpt2-xl_to_gpt2-large": "gpt2-xl_to_gpt2-base",
    "opt13b_to_2.7b": "opt13b_to_1.3b",
    "opt13b_to_6.7b": "opt13b_to_1.3b",
}
SHIPPED = sorted(recipe_files())


def _sft_training(recipe, role: str) -> TrainingConfig:
    """The training settings of a model's SFT stage, merged as the pipeline does."""
    return build(TrainingConfig, {**to_dict(recipe.training), **getattr(recipe, role).sft}, f"{role}.sft")


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_recipe_validates_and_resolves(name):
    recipe = load_recipe(name)
    assert recipe.name == name
    assert recipe.description and "\n" not in recipe.description
    trainings = [recipe.training]
    for method in sorted({"sft", "kd"} | set(recipe.methods)):
        run = resolve_run(recipe, method)
        assert run.method == method
        trainings.append(run.training)
        rollouts = getattr(run.options, "rollout_size", 0)
        assert rollouts % run.training.batch_size == 0, "a rollout buffer must hold whole optimizer steps"
    for role in ("teacher", "student"):
        if getattr(recipe, role).sft is not None:
            trainings.append(_sft_training(recipe, role))
    for training in trainings:
        assert training.batch_size % training.micro_batch_size == 0


def test_paper_recipes_are_shipped():
    assert set(PAPER_RECIPES) <= set(SHIPPED)


@pytest.mark.parametrize("name", sorted(PAPER_RECIPES))
def test_paper_recipe_models_and_budget(name):
    teacher, student, batch_size, promptkd_lr, promptkd_epochs = PAPER_RECIPES[name]
    recipe = load_recipe(name)
    assert recipe.teacher.path == teacher and recipe.student.path == student
    assert recipe.teacher.dtype == "bfloat16"
    assert recipe.training.batch_size == batch_size  # paper appendix A
    assert recipe.training.weight_decay == 0.01 and recipe.training.max_grad_norm == 1.0
    assert recipe.training.lr_schedule == "cosine" and recipe.training.warmup_steps == 0
    # data, sampling and evaluation protocol (paper appendix A; gmkim-ai/PromptKD scripts/gpt2/*/*.sh:
    # --max-prompt-length 256, --max-length 512, top-k 0, top-p 1, T 1; arguments.py: --no-repeat-ngram-size 6)
    assert (recipe.data.dataset, recipe.data.max_prompt_length, recipe.data.max_length) == ("dolly", 256, 512)
    gen = recipe.generation
    assert (gen.temperature, gen.top_k, gen.top_p) == (1.0, 0, 1.0)
    assert recipe.eval.seeds == [10, 20, 30, 40, 50] and recipe.eval.no_repeat_ngram_size == 6
    # the teacher is fine-tuned first; the on-policy students start from a 3-epoch SFT (paper §4.1)
    assert recipe.teacher.sft is not None
    student_sft = _sft_training(recipe, "student")
    assert student_sft.epochs == 3 and student_sft.select_by == "loss"

    kd = resolve_run(recipe, "kd")
    assert kd.options.kd_ratio == 0.5 and kd.options.divergence == "forward_kl" and kd.options.loss_temperature == 1.0
    assert kd.student_init == "pretrained" and resolve_run(recipe, "sft").student_init == "pretrained"

    promptkd = resolve_run(recipe, "promptkd")
    assert promptkd.student_init == "sft"
    assert promptkd.training.lr == promptkd_lr and promptkd.training.epochs == promptkd_epochs
    assert promptkd.training.warmup_steps == 100 and promptkd.training.lr_schedule == "constant"
    assert promptkd.training.batch_size == batch_size
    assert promptkd.options.prompt_length == 7
    assert promptkd.options.prompt_init_text == "Suppose you are a student."

    gkd = resolve_run(recipe, "gkd")  # the PromptKD paper's GKD baseline: RKL on student samples
    assert gkd.options.beta == 1.0 and gkd.options.on_policy_fraction == 1.0 and gkd.student_init == "sft"

    # issue 12: the reference behaviour of each method
    assert gen.max_new_tokens == 256 and recipe.eval.max_new_tokens == 0  # samples: 256 new tokens; eval: to 512
    assert promptkd.options.capped_ending == "eos" and gkd.options.capped_ending == "open"
    assert not gkd.options.student_dropout and gkd.options.loss_temperature == 1.0  # TRL's GKD
    assert resolve_run(recipe, "seqkd").options.targets == "text"
    minillm = resolve_run(recipe, "minillm")
    assert minillm.options.capped_ending == "open" and minillm.options.whiten_padding
    steps_per_collection = minillm.options.rollout_size // minillm.training.batch_size * minillm.options.ppo_epochs
    assert steps_per_collection == (4 if name == "gpt2-xl_to_gpt2-base" else 16)  # 256 rollouts, global batch 256/64


def test_paper_values_per_size():
    base = load_recipe("gpt2-xl_to_gpt2-base")
    # PromptKD scripts/gpt2/{sft,kd}/*_base.sh (= LMOps minillm/scripts/gpt2): lr 5e-4, 20 epochs
    assert base.training.lr == 5e-4 and base.training.epochs == 20
    # the GPT-2 XL teacher's SFT, scripts/gpt2/sft/sft_xlarge.sh: lr 5e-5, 10 epochs
    assert _sft_training(base, "teacher").lr == 5e-5 and _sft_training(base, "teacher").epochs == 10
    medium = load_recipe("gpt2-xl_to_gpt2-medium")
    assert medium.training.batch_size == 8 and medium.student.path == "gpt2-medium"
    assert load_recipe("opt13b_to_6.7b").student.path == "facebook/opt-6.7b"
    assert load_recipe("gpt2-xl_to_gpt2-large").student.dtype == "float32"


@pytest.mark.parametrize(("child", "parent"), sorted(CHILDREN.items()))
def test_children_extend_their_parent(child, parent):
    assert load_raw_recipe(child)["name"] == child
    child_recipe, parent_recipe = load_recipe(child), load_recipe(parent)
    assert child_recipe.description != parent_recipe.description
    assert child_recipe.teacher == parent_recipe.teacher  # same teacher and teacher SFT
    assert child_recipe.data == parent_recipe.data
    assert child_recipe.generation == parent_recipe.generation and child_recipe.eval == parent_recipe.eval
    assert child_recipe.student.path != parent_recipe.student.path
    assert resolve_run(child_recipe, "kd").options == resolve_run(parent_recipe, "kd").options


def test_cli_lists_the_paper_recipes():
    result = CliRunner().invoke(app, ["recipes", "--json"])
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert set(PAPER_RECIPES) | {"tiny"} <= set(rows)
    for name in PAPER_RECIPES:
        assert rows[name]["description"] == load_recipe(name).description
        assert rows[name]["path"].endswith(f"{name}.toml")
