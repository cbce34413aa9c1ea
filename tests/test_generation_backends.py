"""The generation-backend hook: every sample of a run and of an evaluation is
drawn through the recipe's ``[generation] backend``; a third-party backend
registers through the same hook as the built-in ones; a backend that is
unknown or cannot run here is refused when the recipe loads."""

from __future__ import annotations

import pytest

from distillkit.api import GenerationBackend, hookimpl
from distillkit.builtins.generation_backends import vllm_sample
from distillkit.config import load_recipe
from distillkit.engine.sampling import sample
from distillkit.errors import DistillkitError
from distillkit.evaluation.protocol import generate
from distillkit.registry import registry
from tests.conftest import instruction_examples, make_run, plugins_installed, tiny_model


class CountingBackend:
    """A third-party backend: the reference sampler, counting its calls and prompts."""

    def __init__(self) -> None:
        self.prompts = 0

    def sample(self, model, prompts, settings, **keywords):
        self.prompts += len(prompts)
        return sample(model, prompts, settings, **keywords)

    @hookimpl
    def distillkit_register_generation_backends(self) -> list[GenerationBackend]:
        return [GenerationBackend("counting", "the reference sampler, counted", self.sample)]


def test_the_default_backend_is_the_reference_sampler(recipe_file):
    recipe = load_recipe(str(recipe_file()))
    assert recipe.generation.backend == "transformers"
    assert registry().generation_backends["transformers"].sample is sample
    assert "backend" not in recipe.generation.identity()  # caches keyed before the hook are still found


def test_run_and_evaluation_samples_go_through_the_recipes_backend(monkeypatch, recipe_file, tokenizer):
    backend = CountingBackend()
    examples = instruction_examples(tokenizer)
    prompts = [e.prompt_ids for e in examples]
    with plugins_installed(monkeypatch, {"counting": backend}):
        reference = make_run(recipe_file, tokenizer, "gkd")
        run = make_run(recipe_file, tokenizer, "gkd", overrides=["generation.backend=counting"])
        assert run.sample(run.student, prompts) == reference.sample(reference.student, prompts)
        assert backend.prompts == len(prompts)
        settings = run.config.recipe.generation
        generate(tiny_model(tokenizer), tokenizer, examples, settings, seed=1, batch_size=2, max_length=64)
        assert backend.prompts == 2 * len(prompts)
        assert run.config.recipe.generation.identity()["backend"] == "counting"  # keys caches of samples


def test_an_unknown_backend_is_refused_with_the_registered_names(recipe_file):
    with pytest.raises(DistillkitError, match="generation.backend") as info:
        load_recipe(str(recipe_file()), ["generation.backend=vlm"])
    assert "transformers" in str(info.value)


def test_vllm_is_refused_with_its_reason_before_any_model_loads(recipe_file):
    with pytest.raises(DistillkitError, match="generation.backend = 'vllm' cannot run here: the vLLM backend is "
                                              "not implemented yet"):
        load_recipe(str(recipe_file()), ["generation.backend=vllm"])
    with pytest.raises(NotImplementedError, match="GPU machine"):
        vllm_sample()
