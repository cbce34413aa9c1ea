"""Shared helpers of the side-by-side benchmarks (not a benchmark itself).

Every benchmark runs all of its arms in ONE process, interleaved (the order
rotates every repeat), and reports per-repeat *paired* ratios: on a shared
CPU the absolute timings drift with the load of other processes, while two
arms timed back to back see (nearly) the same load.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import time
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

DEFAULT_DATA_DIR = str(Path(__file__).resolve().parents[2] / "shared" / "data")  # ../shared/data

# A 6-step run of 1-layer models with a checkpoint and a validation every 2 steps (seconds per method).
SHORT_RUN_RECIPE = """
description = "short run: 1-layer models, 6 steps"
[data]
dataset = "dolly"
max_prompt_length = 96
max_length = 128
train_limit = 96
[tokenizer]
train_vocab_size = 400
[teacher]
config = { model_type = "gpt2", n_layer = 1, n_embd = 48, n_head = 2, n_positions = 128 }
init_seed = 1
[teacher.sft]
max_steps = 6
lr = 1e-2
[student]
config = { model_type = "gpt2", n_layer = 1, n_embd = 32, n_head = 2, n_positions = 128 }
init_seed = 2
[training]
max_steps = 6
batch_size = 8
micro_batch_size = 4
lr = 1e-2
lr_schedule = "constant"
eval_every = 2
eval_limit = 6
log_every = 1
seed = 3
[generation]
max_new_tokens = 8
batch_size = 6
[methods.minillm]
rollout_size = 16
"""


def cli_environment(cache: Path) -> dict[str, str]:
    """The environment for a `distillkit` subprocess: its own cache, the shared data, quiet OpenMP waits."""
    return {**os.environ, "DISTILLKIT_CACHE_DIR": str(cache), "OMP_WAIT_POLICY": "PASSIVE",
            "DISTILLKIT_DATA_DIR": os.environ.get("DISTILLKIT_DATA_DIR", DEFAULT_DATA_DIR)}


def common_arguments(parser: argparse.ArgumentParser, *, repeats: int) -> None:
    parser.add_argument("--repeats", type=int, default=repeats, help=f"timed repeats per arm (default {repeats})")
    parser.add_argument("--quick", action="store_true", help="a smaller, faster run (smoke test)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: on a shared 2-core machine 2 threads contend with "
                             "other processes and make timings erratic)")
    parser.add_argument("--seed", type=int, default=0)


def setup(threads: int, seed: int) -> None:
    """Data dir, thread count, quiet libraries, seeds."""
    os.environ.setdefault("DISTILLKIT_DATA_DIR", DEFAULT_DATA_DIR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    import transformers

    torch.set_num_threads(threads)
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    random.seed(seed)
    torch.manual_seed(seed)


def dolly_tokenizer(vocab_size: int = 4096):
    """A byte-level BPE tokenizer trained on the Dolly training split, as the
    tiny recipe does (``format_prompt(e) + reference``); ~3 s."""
    from distillkit.config import DataConfig
    from distillkit.data.loading import load_split
    from distillkit.data.templates import format_prompt
    from distillkit.engine.models import train_bpe_tokenizer

    examples = load_split(DataConfig(dataset="dolly"), "train")
    return train_bpe_tokenizer((format_prompt(e) + e.references[0] for e in examples), vocab_size)


def gpt2(tokenizer, *, n_layer: int, n_embd: int, n_head: int, n_positions: int = 256, seed: int = 0):
    """A GPT-2 model with random weights, built from config the way recipes do
    (dropout off, as in the tiny recipe)."""
    from distillkit.config import ModelConfig
    from distillkit.engine.models import load_model

    config = {"model_type": "gpt2", "n_layer": n_layer, "n_embd": n_embd, "n_head": n_head,
              "n_positions": n_positions, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    return load_model(ModelConfig(config=config, init_seed=seed), tokenizer, "student")


def parameter_count(module) -> int:
    return sum(p.numel() for p in module.parameters())


# --- interleaved timing ----------------------------------------------------------


def interleaved(arms: dict[str, Callable[[int], object]], repeats: int, *, warmup: int = 1,
                before: Callable[[int], None] | None = None) -> dict[str, list[float]]:
    """Run every arm ``warmup + repeats`` times; in repeat r the arms run in
    an order rotated by r, and ``before(r)`` (e.g. re-seeding) runs before
    each arm.  Each arm gets the repeat index.  Returns seconds of the timed
    repeats per arm."""
    names = list(arms)
    times: dict[str, list[float]] = {name: [] for name in names}
    for index in range(warmup + repeats):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            if before is not None:
                before(index)
            started = time.perf_counter()
            arms[name](index)
            seconds = time.perf_counter() - started
            if index >= warmup:
                times[name].append(seconds)
    return times


@dataclass
class Summary:
    mean: float
    sd: float
    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: list[float]) -> Summary:
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return cls(statistics.fmean(values), sd, statistics.median(values), min(values), max(values))


def paired_ratios(numerator: list[float], denominator: list[float]) -> list[float]:
    return [a / b for a, b in zip(numerator, denominator)]


def ratio_line(label: str, numerator: list[float], denominator: list[float], target: str = "") -> str:
    """Paired per-repeat ratios numerator[i] / denominator[i] (mean ± sd,
    median, range) and, as a load-robust cross-check, the ratio of the two
    arms' fastest repeats."""
    ratios = paired_ratios(numerator, denominator)
    s = Summary.of(ratios)
    text = (f"{label}: mean {s.mean:.3f} ± {s.sd:.3f} (sd), median {s.median:.3f}, "
            f"range {s.low:.3f}–{s.high:.3f}, n={len(ratios)}; fastest/fastest {min(numerator) / min(denominator):.3f}")
    return text + (f"   [target {target}]" if target else "")


def table(headers: list[str], rows: list[list[str]]) -> str:
    """A Markdown table (readable as plain text too)."""
    widths = [max(len(str(x)) for x in column) for column in zip(headers, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def machine_note(threads: int) -> str:
    import torch

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan
    return (f"torch {torch.__version__}, {os.cpu_count()} CPU cores (shared), torch threads {threads}, "
            f"1-min load average at start {load:.2f}")


@contextmanager
def timed_calls(owner: object, attribute: str, bucket: list[float]):
    """Temporarily shadow the method ``owner.attribute`` of an instance (or a
    module's function) with a wrapper that appends the seconds of each call to
    ``bucket``."""
    original = getattr(owner, attribute)
    own = attribute in vars(owner)  # a module's function (or an instance's own attribute): put it back after

    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            bucket.append(time.perf_counter() - started)

    setattr(owner, attribute, wrapper)
    try:
        yield
    finally:
        if own:
            setattr(owner, attribute, original)
        else:
            delattr(owner, attribute)


# --- distillkit trainers on the tiny recipe ------------------------------------------


@dataclass
class TinySetup:
    """The tiny recipe's pieces: tokenizer, tokenized Dolly training rows and
    freshly built (random-weight) teacher and student."""

    recipe: object
    tokenizer: object
    train_examples: list
    teacher: object
    student: object


def tiny_setup(overrides: list[str]) -> TinySetup:
    from distillkit.config import load_recipe
    from distillkit.data.loading import load_split
    from distillkit.data.tokenization import tokenize
    from distillkit.engine.models import load_model

    recipe = load_recipe("tiny", overrides)
    tokenizer = dolly_tokenizer(recipe.tokenizer.train_vocab_size)
    rows = load_split(recipe.data, "train")
    examples, _ = tokenize(rows, tokenizer, max_prompt_length=recipe.data.max_prompt_length,
                           max_length=recipe.data.max_length, long_prompts=recipe.data.long_prompts)
    teacher = load_model(recipe.teacher, tokenizer, "teacher")
    student = load_model(recipe.student, tokenizer, "student")
    return TinySetup(recipe, tokenizer, examples, teacher, student)


def on_policy_arguments(parser: argparse.ArgumentParser, *, repeats: int) -> None:
    """Arguments of the GKD and PromptKD step benchmarks."""
    common_arguments(parser, repeats=repeats)
    parser.add_argument("--max-new-tokens", type=int, default=128, help="the tiny recipe's value (default 128)")


def on_policy_setup(args: argparse.Namespace, extra_overrides: tuple[str, ...] = ()) -> TinySetup:
    """The on-policy benchmarks' common start: quick mode, seeds, and the tiny
    recipe's models with GKD sampling every step (lambda = 1)."""
    if args.quick:
        args.repeats, args.max_new_tokens = min(args.repeats, 3), min(args.max_new_tokens, 32)
    setup(args.threads, args.seed)
    print(machine_note(args.threads))
    overrides = ["methods.gkd.on_policy_fraction=1.0", "training.batch_size=8", "training.micro_batch_size=8",
                 f"generation.max_new_tokens={args.max_new_tokens}", f"training.seed={args.seed + 10}",
                 *extra_overrides]
    return tiny_setup(overrides)


def trainer_for(setup: TinySetup, method: str, output_dir, *, student=None, teacher=None):
    """A real ``distillkit.training.trainer.Trainer`` for ``method`` (no validation
    set), on copies of the setup's models unless given."""
    import copy

    from distillkit.config import resolve_run
    from distillkit.training.trainer import Trainer

    config = resolve_run(setup.recipe, method)
    return Trainer(config, student if student is not None else copy.deepcopy(setup.student), setup.tokenizer,
                   setup.train_examples, [], output_dir,
                   teacher=teacher if teacher is not None else copy.deepcopy(setup.teacher))


class StepProbe:
    """Instruments a Trainer without changing what it does: seconds spent in
    sampling (``run.sample``) and the token counts of the batches its source
    builds, per step."""

    def __init__(self, trainer) -> None:
        self.trainer = trainer
        self.sampling: list[float] = []
        self.tokens: list[int] = []
        self.response_tokens: list[int] = []
        source = trainer.source

        def recording_source(examples):
            batch = source(examples)
            self.tokens.append(int(batch.attention_mask.sum()))
            self.response_tokens.append(batch.num_response_tokens)
            return batch

        trainer.source = recording_source

    def step(self, k: int) -> dict:
        """Optimizer step k exactly as ``Trainer.fit`` runs it (same examples
        and schedule position), timing the sampling inside."""
        self.trainer.state.step = self.trainer.run.step = k
        spent: list[float] = []
        with timed_calls(self.trainer.run, "sample", spent):
            logs = self.trainer.train_step()
        self.sampling.append(sum(spent))
        return logs
