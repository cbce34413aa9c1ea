"""Shared fixtures: real Dolly data from ../shared/data, a locally trained
tokenizer, tiny models built from config, and a tiny recipe file."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("DISTILLKIT_DATA_DIR", REPO.parent / "shared" / "data")).resolve()
DOLLY = SHARED_DATA / "databricks-dolly-15k" / "minillm"

TINY_RECIPE = """
description = "test recipe: 1-layer models, a few steps"
[data]
dataset = "dolly"
max_prompt_length = 96
max_length = 128
train_limit = 96
[tokenizer]
train_vocab_size = 400
[teacher]
config = {{ model_type = "gpt2", n_layer = 1, n_embd = 48, n_head = 2, n_positions = 128 }}
init_seed = 1
[teacher.sft]
max_steps = 6
lr = 1e-2
[student]
config = {{ model_type = "gpt2", n_layer = 1, n_embd = 32, n_head = 2, n_positions = 128 }}
init_seed = 2
[training]
max_steps = {steps}
batch_size = 8
micro_batch_size = 4
lr = 1e-2
warmup_steps = 0
lr_schedule = "constant"
eval_every = {eval_every}
eval_limit = 6
log_every = 1
seed = 3
group_by_length = true
[generation]
max_new_tokens = 8
batch_size = 6
[eval]
seeds = [10, 20]
[methods.minillm]
rollout_size = 16
"""


@pytest.fixture(autouse=True, scope="session")
def _data_dir() -> None:
    """Tests read the real data from ../shared/data (as CI does)."""
    if not DOLLY.is_dir():
        pytest.exit(f"real data not found at {SHARED_DATA}; set DISTILLKIT_DATA_DIR", returncode=4)
    os.environ["DISTILLKIT_DATA_DIR"] = str(SHARED_DATA)
    torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISTILLKIT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="session")
def tokenizer():
    """A 300-token byte-level BPE tokenizer trained on real Dolly rows."""
    from distillkit.config import DataConfig
    from distillkit.data.loading import load_split
    from distillkit.data.templates import format_prompt
    from distillkit.engine.models import train_bpe_tokenizer

    examples = load_split(DataConfig(dataset="dolly"), "validation")[:300]
    return train_bpe_tokenizer((format_prompt(e) + e.references[0] for e in examples), 300)


def write_jsonl(path: Path, rows: list) -> Path:
    """Write rows (dicts, or raw strings for malformed lines) as a JSONL file."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def tiny_model(tokenizer, *, n_layer: int = 1, n_embd: int = 32, seed: int = 0, vocab_size: int | None = None,
               n_positions: int = 256):
    from distillkit.config import ModelConfig
    from distillkit.engine.models import load_model

    config = {"model_type": "gpt2", "n_layer": n_layer, "n_embd": n_embd, "n_head": 2, "n_positions": n_positions}
    if vocab_size is not None:
        config["vocab_size"] = vocab_size
    return load_model(ModelConfig(config=config, init_seed=seed), tokenizer, "student")


@pytest.fixture
def recipe_file(tmp_path: Path):
    """Write the tiny test recipe with a given step budget; returns its path."""

    def write(steps: int = 6, eval_every: int = 3) -> Path:
        path = tmp_path / "test-tiny.toml"
        path.write_text(TINY_RECIPE.format(steps=steps, eval_every=eval_every))
        return path

    return write


def make_run(recipe_file, tokenizer, method: str = "promptkd", overrides=(), examples=()):
    """A :class:`~distillkit.training.run.Run` of the test recipe with a tiny student (no teacher)."""
    from distillkit.config import load_recipe, resolve_run
    from distillkit.training.run import Run

    config = resolve_run(load_recipe(str(recipe_file()), list(overrides)), method)
    return Run(config, tiny_model(tokenizer, seed=7), tokenizer, total_steps=10, train_examples=list(examples),
               teacher_id="test-teacher")


def instruction_examples(tokenizer, texts=("Name a colour.", "Say hi", "Tell me about cats")):
    """Tokenized examples with short templated prompts and a fixed response."""
    from distillkit.api import InstructionExample, TokenizedExample

    out = []
    for text in texts:
        prompt = tokenizer(f"### Instruction:\n{text}\n\n### Response:\n")["input_ids"]
        response = tokenizer("A short answer.")["input_ids"] + [tokenizer.eos_token_id]
        out.append(TokenizedExample(prompt, response, InstructionExample(text, "", ("A short answer.",))))
    return out


class Killed(BaseException):
    """A process killed mid-run, as an exception that no ``except Exception`` in the code under test catches."""


def train_killed_during_step(monkeypatch: pytest.MonkeyPatch, step: int, train: Callable[[], object]) -> None:
    """Run ``train()``, killed (:class:`Killed`) during its ``step``-th
    optimizer step: ``Trainer.train_step`` raises at its ``step``-th call
    from now, counted over every trainer (so let the cached models be
    prepared before).  Fails unless the run dies there."""
    from distillkit.training.trainer import Trainer

    original, calls = Trainer.train_step, 0

    def dying(self):
        nonlocal calls
        calls += 1
        if calls == step:
            raise Killed
        return original(self)

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "train_step", dying)
        with pytest.raises(Killed):
            train()


def assert_resumes_exactly(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, method: str, recipe: str,
                           overrides: list[str], *, steps: int = 4, kill_at: int = 3) -> None:
    """A run of ``method`` killed during step ``kill_at`` and resumed ends with the same step-``steps``
    weights as an uninterrupted one (the recipe checkpoints before ``kill_at``)."""
    from distillkit.training.pipeline import train

    train(method, recipe, output=tmp_path / "straight", overrides=overrides)
    train_killed_during_step(monkeypatch, kill_at, lambda: train(method, recipe, output=tmp_path / "killed",
                                                                 overrides=overrides))
    train(method, recipe, output=tmp_path / "killed", overrides=overrides, resume=True)
    final = f"checkpoints/step-{steps:07d}/model.safetensors"
    assert_same_tensors(tmp_path / "straight" / final, tmp_path / "killed" / final)


def assert_same_tensors(first: Path, second: Path) -> None:
    """Two safetensors files hold the same tensors, bit for bit."""
    from safetensors.torch import load_file

    a, b = load_file(first), load_file(second)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[key], b[key]) for key in a), [key for key in a if not torch.equal(a[key], b[key])]


@contextlib.contextmanager
def plugins_installed(monkeypatch: pytest.MonkeyPatch, plugins: dict[str, object]) -> Iterator[None]:
    """Within the context, the registry holds ``plugins`` (name -> plugin object)
    next to the installed ones, as if a third-party package registered them."""
    import distillkit.registry as registry_module

    make = registry_module.make_plugin_manager
    monkeypatch.setattr(registry_module, "make_plugin_manager", lambda extra=None: make(plugins))
    registry_module.registry.cache_clear()
    try:
        yield
    finally:
        registry_module.registry.cache_clear()
