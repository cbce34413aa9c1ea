"""The cached top-k teacher signal (``[teacher_signal] top_k``) on the
``smollm2`` recipe: how far the sparse divergence is from the dense one, and
what a KD step costs when it reads the cache instead of running the teacher.

    python benchmarks/bench_teacher_signal.py [--repeats N] [--quick] [--train-limit N] [--micro-batches N]

Real weights (SmolLM2-135M-Instruct teacher, V = 49,152; the student is the
teacher cut to 10 layers, what KD starts from) and real Dolly training rows,
tokenized by the recipe's pipeline (``data.train_limit`` of them).

1. Approximation error: on the first ``--micro-batches`` KD micro-batches,
   the mean over response tokens of each divergence between the student and
   the dense teacher, and between the student and the teacher's top-k signal
   at k = 16, 64, 256 and V (as the cache stores it: fp16 log-probs, fp32
   tail; k = V must give ~0); the teacher's tail mass P(tail) and the stored
   bytes per response token at each k.
2. KD step time: ``Trainer.train_step()`` (forward, backward, AdamW step) of
   two real Trainers on the same examples at step k, interleaved: the online
   teacher's logits (``top_k = 0``) and a TopKSignal (``top_k = 64``) read from
   the filled TopKCache and attached inside the step.  The fill (one teacher
   pass over the training rows, into a fresh cache folder) is timed once.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

if TYPE_CHECKING:
    import torch

    from distillkit.api import TopKSignal, TrainBatch
    from distillkit.training.trainer import Trainer

DIVERGENCES = ("forward_kl", "reverse_kl", "skew_forward_kl", "skew_reverse_kl", "ab", "tvd")
TOP_KS = (16, 64, 256)
STEP_K = 64


def smollm2_setup(overrides: list[str]) -> _common.TinySetup:
    """The smollm2 recipe's tokenizer, tokenized training rows, teacher and student, as ``distillkit train`` builds
    them."""
    from distillkit.config import load_recipe
    from distillkit.data.prepare import prepare_data, recipe_tokenizer
    from distillkit.engine.models import load_model

    recipe = load_recipe("smollm2", overrides)
    tokenizer, _ = recipe_tokenizer(recipe)
    train = prepare_data(recipe, tokenizer).train
    teacher = load_model(recipe.teacher, tokenizer, "teacher")
    student = load_model(recipe.student, tokenizer, "student", teacher=recipe.teacher)
    return _common.TinySetup(recipe, tokenizer, train, teacher, student)


def stored_signal(teacher_logits: torch.Tensor, mask: torch.Tensor, k: int) -> TopKSignal:
    """The teacher's top-k signal (B, T-1, k) at the masked positions, rounded as the cache stores it."""
    import torch

    from distillkit.api import TopKSignal
    from distillkit.engine.losses import log_rest
    from distillkit.engine.topk_cache import to_fp16_range

    logp = torch.log_softmax(teacher_logits[mask].float(), dim=-1)
    values, indices = logp.topk(k, dim=-1)
    signal = TopKSignal(torch.zeros(*mask.shape, k, dtype=torch.long), torch.zeros(*mask.shape, k),
                        torch.zeros(mask.shape))
    signal.indices[mask], signal.logprobs[mask] = indices, to_fp16_range(values).float()
    signal.tail[mask] = log_rest(logp, indices).squeeze(-1)
    return signal


def approximation(setup: _common.TinySetup, batches: list[TrainBatch],
                  ks: list[int]) -> tuple[list[list[str]], list[list[str]]]:
    """Rows of the error table (divergence, k) and of the tail-mass / storage table (k)."""
    import torch

    from distillkit.engine.losses import masked_token_divergences
    from distillkit.engine.topk_cache import TopKCache
    from distillkit.registry import registry

    vocab = len(setup.tokenizer)
    divergences = {name: registry().divergences[name] for name in DIVERGENCES}
    dense: dict[str, list] = {name: [] for name in DIVERGENCES}
    sparse: dict[tuple[str, int], list] = {(name, k): [] for name in DIVERGENCES for k in ks}
    tails: dict[int, list] = {k: [] for k in ks}
    for batch in batches:
        mask = batch.label_mask
        with torch.no_grad():
            teacher, student = (model.eval()(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
                                [:, :-1, :vocab] for model in (setup.teacher, setup.student))
            for name, divergence in divergences.items():
                dense[name].append(masked_token_divergences(divergence, student, teacher, mask))
            for k in ks:
                signal = stored_signal(teacher, mask, k)
                tails[k].append(signal.tail[mask].exp())
                for name, divergence in divergences.items():
                    sparse[name, k].append(masked_token_divergences(divergence, student, signal, mask))
    errors = []
    for name in DIVERGENCES:
        exact = float(torch.cat(dense[name]).mean())
        for k in ks:
            value = float(torch.cat(sparse[name, k]).mean())
            errors.append([name, "V" if k == vocab else str(k), f"{exact:.4f}", f"{value:.4f}",
                           f"{value - exact:+.2e}", f"{(value - exact) / exact:+.2%}"])
    storage = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in ks:
            tail = torch.cat(tails[k])
            stored = TopKCache(Path(tmp) / str(k), k=k, vocab_size=vocab).bytes_per_position
            storage.append(["V" if k == vocab else str(k), f"{float(tail.mean()):.4f}", f"{float(tail.median()):.4f}",
                            f"{float(tail.max()):.4f}", f"{stored:,}", f"{stored / (4 * vocab):.4f}"])
    return errors, storage


def step_arm(trainer: Trainer, owner: object, attribute: str, seconds: list[float],
             kl: list[float]) -> Callable[[int], None]:
    """Optimizer step k of ``trainer`` (the examples of step k), recording the seconds spent in ``owner.attribute``
    and the logged KL."""

    def step(k: int) -> None:
        trainer.state.step = trainer.run.step = k
        spent: list[float] = []
        with _common.timed_calls(owner, attribute, spent):
            kl.append(trainer.train_step()["kl"])
        seconds.append(sum(spent))

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common.common_arguments(parser, repeats=6)
    parser.add_argument("--train-limit", type=int, default=96,
                        help="Dolly training rows tokenized and filled into the cache (default 96)")
    parser.add_argument("--micro-batches", type=int, default=4,
                        help="micro-batches scored for the approximation error (default 4)")
    args = parser.parse_args()
    batch_size = 8  # the recipe's batch = micro-batch
    if args.quick:
        args.repeats, args.train_limit, args.micro_batches, batch_size = min(args.repeats, 3), 16, 1, 2
    _common.setup(args.threads, args.seed)
    print(_common.machine_note(args.threads))
    import distillkit.training.trainer as trainer_module
    from distillkit.config import load_recipe
    from distillkit.files import CACHE_ENV

    steps = 1 + args.repeats  # warm-up + timed; step k trains on the examples of step k
    overrides = [f"data.train_limit={args.train_limit}", f"training.batch_size={batch_size}",
                 f"training.micro_batch_size={batch_size}", f"training.max_steps={steps}",
                 "training.progress_bar=false"]
    setup = smollm2_setup(overrides)
    cached = dataclasses.replace(setup, recipe=load_recipe("smollm2", [*overrides, f"teacher_signal.top_k={STEP_K}"]))
    vocab = len(setup.tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        online = _common.trainer_for(setup, "kd", Path(tmp) / "online", teacher=setup.teacher)
        fill: list[float] = []
        with mock.patch.dict(os.environ, {CACHE_ENV: str(Path(tmp) / "cache")}), \
                _common.timed_calls(trainer_module, "prepare_teacher_signals", fill):
            sparse = _common.trainer_for(cached, "kd", Path(tmp) / "cached", teacher=setup.teacher)
        batches = [b for k in range(args.micro_batches) for b in online.micro_batches(online.examples_for_step(k))]
        response_tokens = sum(b.num_response_tokens for b in batches)
        print(f"smollm2 recipe: teacher {_common.parameter_count(setup.teacher) / 1e6:.1f}M, student "
              f"{_common.parameter_count(setup.student) / 1e6:.1f}M params (real weights), vocab {vocab}; "
              f"{len(setup.train_examples)} Dolly training rows (train_limit {args.train_limit})\n")
        print(f"## 1. approximation error: student (cut, untrained) vs teacher on {len(batches)} micro-batches "
              f"of {batch_size} training sequences, {response_tokens} response tokens; mean nats/token; sparse = "
              "the k + 1 coarsened outcomes, teacher top-k as stored (fp16 log-probs, fp32 tail)\n")
        errors, storage = approximation(setup, batches, [*TOP_KS, vocab])
        print(_common.table(["divergence", "k", "dense", "sparse", "sparse - dense", "relative"], errors))
        print()
        print(_common.table(["k", "teacher P(tail) mean", "median", "max", "stored bytes/response token",
                             "x dense fp32 logits"], storage))

        teacher_s: list[float] = []
        read_s: list[float] = []
        kls: dict[str, list[float]] = {"online teacher (top_k = 0)": [], f"cached top-{STEP_K}": []}
        names = list(kls)
        arms = {names[0]: step_arm(online, online.run, "teacher_logits", teacher_s, kls[names[0]]),
                names[1]: step_arm(sparse, sparse.signals, "attach", read_s, kls[names[1]])}
        same = sum(online.examples_for_step(k) == sparse.examples_for_step(k) for k in range(steps))
        times = _common.interleaved(arms, args.repeats, warmup=1)
        cache = sparse.signals.cache
        cache_bytes, bytes_per_position = cache.size_bytes(), cache.bytes_per_position
        response = statistics.fmean(b.num_response_tokens for k in range(1, steps)
                                    for b in online.micro_batches(online.examples_for_step(k)))

    print(f"\n## 2. KD step (forward + backward + AdamW), batch = micro-batch = {batch_size}; repeats {args.repeats} "
          f"(+1 warm-up); same examples in both arms at {same}/{steps} steps\n")
    inner = {names[0]: teacher_s[1:], names[1]: read_s[1:]}
    rows = []
    for name, values in times.items():
        s = _common.Summary.of(values)
        rest = [t - u for t, u in zip(values, inner[name])]
        rows.append([name, f"{s.median:.3f}", f"{s.mean:.3f} ± {s.sd:.3f}", f"{statistics.median(inner[name]):.3f}",
                     f"{statistics.median(rest):.3f}", f"{statistics.median(kls[name][1:]):.4f}"])
    print(_common.table(["arm", "median s/step", "mean ± sd s", "teacher forward / cache read + attach s (median)",
                         "rest s (median)", "logged KL (median)"], rows))
    print(f"(response tokens per step: {response:.0f})\n")
    print(_common.ratio_line(f"ratio cached top-{STEP_K} / online teacher (step time)", times[names[1]],
                             times[names[0]], "<= 0.6"))
    print(_common.ratio_line("ratio cached / online (step minus teacher forward / cache read)",
                             [t - u for t, u in zip(times[names[1]], inner[names[1]])],
                             [t - u for t, u in zip(times[names[0]], inner[names[0]])]))
    rows_n = len(setup.train_examples)
    filled_tokens = sum(len(e.response_ids) for e in setup.train_examples)
    print(f"\nfill (one-off, top-{STEP_K}, micro-batches of {batch_size}, into a fresh cache):")
    print(_common.table(["sequences", "response tokens", "fill s", "s/sequence", "ms/response token", "cache MB",
                         "on-disk bytes/response token", "format bytes/position"],
                        [[str(rows_n), str(filled_tokens), f"{fill[0]:.1f}", f"{fill[0] / rows_n:.3f}",
                          f"{1000 * fill[0] / filled_tokens:.2f}", f"{cache_bytes / 1e6:.2f}",
                          f"{cache_bytes / filled_tokens:.1f}", str(bytes_per_position)]]))


if __name__ == "__main__":
    main()
