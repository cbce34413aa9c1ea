"""Helpers of the example's own tests: a tiny recipe (1-layer GPT-2s built from config, a few steps on
real Dolly), a session cache, and the ``distillkit`` command line run as a user would (a subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# $DISTILLKIT_DATA_DIR, else the data folder beside this repository (as its Makefile and tests assume)
DATA_DIR = Path(os.environ.get("DISTILLKIT_DATA_DIR", Path(__file__).resolve().parents[3].parent / "shared" / "data"))

TEST_RECIPE = """
description = "distillkit-akl test recipe: 1-layer models, a few steps"
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
config = {{ model_type = "gpt2", n_layer = 1, n_embd = 32, n_head = 2, n_positions = 128, resid_pdrop = 0.1 }}
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
progress_bar = false
[generation]
max_new_tokens = 8
batch_size = 6
"""


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One distillkit cache for the session: the tokenizer and teacher are prepared once."""
    if not (DATA_DIR / "databricks-dolly-15k").is_dir():
        pytest.exit(f"Dolly not found under {DATA_DIR}; set DISTILLKIT_DATA_DIR", returncode=4)
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def recipe(tmp_path: Path):
    """Write the test recipe with a step budget (dropout on: resuming must restore the RNG); returns its path."""

    def write(steps: int = 6, eval_every: int = 2) -> Path:
        path = tmp_path / "akl-test.toml"
        path.write_text(TEST_RECIPE.format(steps=steps, eval_every=eval_every))
        return path

    return write


def environment(cache_dir: Path) -> dict[str, str]:
    return {**os.environ, "DISTILLKIT_DATA_DIR": str(DATA_DIR), "DISTILLKIT_CACHE_DIR": str(cache_dir),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}


def distillkit_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "distillkit", *args]


def distillkit(cache_dir: Path, *args: str) -> subprocess.CompletedProcess:
    """Run ``distillkit ARGS`` and return the finished process (text output)."""
    return subprocess.run(distillkit_command(*args), env=environment(cache_dir), capture_output=True, text=True,
                          timeout=900)


def losses(run_dir: Path) -> list[float]:
    """The training loss of each logged step of a run folder."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "val/rougeL" not in r]
