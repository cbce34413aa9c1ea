"""One GKD optimizer step: distillkit's Trainer against a minimal hand-written
PyTorch step (the floor), side by side.

    python benchmarks/bench_gkd.py [--repeats N] [--quick]

distillkit arm: a real ``distillkit.training.trainer.Trainer`` on the ``tiny`` recipe
(``methods.gkd.on_policy_fraction = 1.0`` so every step samples,
batch_size = micro_batch_size = 8, random-weight teacher and student built
from the recipe's configs, tokenized Dolly training rows); the timed call is
``trainer.train_step()``.

floor arm: ``floor_step`` below -- sample with a KV cache, teacher forward
without grad, student forward, generalized JSD(beta = 0.5) on response
tokens only, AdamW step (with the same grad-norm clip 1.0 the trainer
applies).  It samples with ``distillkit.engine.sampling.sample`` by default, so the
ratio isolates the training path; ``--floor-sampler generate`` uses 🤗
``generate`` instead (the sampler itself is compared in bench_sampler.py).

lean floor arm: the same step as one would write it for speed: the output
layers see only the columns from the first response position on
(``logits_to_keep`` as a position index), and AdamW is ``fused=True``.

Step k of every arm uses the same prompts (the trainer's examples for step
k) and, with the distillkit sampler, the same row-keyed noise and per-row
length limits as the trainer (keyed by the training seed, k and the
prompt), so all arms sample the same tokens as long as their students agree.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

DISTILLKIT, FLOOR, LEAN = "distillkit Trainer.train_step", "hand-written floor", "lean floor"


def make_floor(student, teacher, tokenizer, *, max_new_tokens: int, max_length: int, lr: float, beta: float,
               sampler: str, seed: int, lean: bool = False):
    """The minimal hand-written GKD step, as one would write it in a script (``lean``: the output layers
    only from the first response position on, fused AdamW)."""
    import torch

    from distillkit.config import GenerationConfig
    from distillkit.engine.sampling import sample
    from distillkit.files import fingerprint

    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.01, fused=lean or None)
    teacher.eval().requires_grad_(False)

    def generate(prompts: list[list[int]], budget: int) -> list[list[int]]:
        width = max(map(len, prompts))  # left-pad; generate derives position ids from the mask
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        student.eval()
        with torch.no_grad():
            out = student.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_k=0, top_p=1.0,
                                   temperature=1.0, max_new_tokens=budget, pad_token_id=pad, eos_token_id=eos)
        rows = out[:, width:].tolist()
        return [r[: r.index(eos) + 1] if eos in r else r for r in rows]

    def floor_step(prompts: list[list[int]], step: int) -> dict[str, float]:
        # 1. y ~ q(.|x): the student samples (KV cache, no grad), EOS kept; lambda = 1: always student samples
        started = time.perf_counter()
        if sampler == "generate":
            responses = generate(prompts, min(max_new_tokens, max_length - max(map(len, prompts))))
        else:  # the trainer's row keys and per-row limits: the same noise for the same prompt and step
            responses = sample(student, prompts, GenerationConfig(max_new_tokens=max_new_tokens), eos_token_id=eos,
                               pad_token_id=pad, vocab_size=len(tokenizer), max_length=max_length,
                               row_keys=[int(fingerprint(seed, step, p), 16) for p in prompts])
        sampling = time.perf_counter() - started
        # 2. right-padded [x ‖ y] with a response mask
        seqs = [p + r for p, r in zip(prompts, responses)]
        width = max(map(len, seqs))
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
        attention = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
        response = torch.tensor([[0] * len(p) + [1] * len(r) + [0] * (width - len(s))
                                 for p, r, s in zip(prompts, responses, seqs)], dtype=torch.bool)
        # 3. teacher (no grad) and student (train mode) next-token logits on response positions
        student.train()
        mask = response[:, 1:]
        keep = {}
        if lean:  # the output layers from the first response position on
            first = int(mask.any(0).nonzero()[0])
            keep, mask = {"logits_to_keep": torch.arange(first, width - 1)}, mask[:, first:]
        with torch.no_grad():
            teacher_logits = teacher(input_ids=ids, attention_mask=attention, **keep).logits
        student_logits = student(input_ids=ids, attention_mask=attention, **keep).logits
        if not lean:
            teacher_logits, student_logits = teacher_logits[:, :-1], student_logits[:, :-1]
        teacher_logits, student_logits = teacher_logits[mask], student_logits[mask]
        # 4. generalized JSD(beta): beta KL(P || M) + (1 - beta) KL(Q || M), M = beta P + (1 - beta) Q
        log_p = torch.log_softmax(teacher_logits.float(), -1)
        log_q = torch.log_softmax(student_logits.float(), -1)
        log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
        jsd = beta * (log_p.exp() * (log_p - log_m)).sum(-1) + (1 - beta) * (log_q.exp() * (log_q - log_m)).sum(-1)
        loss = jsd.mean()
        # 5. AdamW step
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return {"loss": float(loss), "sampling": sampling, "tokens": int(attention.sum()),
                "response_tokens": int(mask.sum())}

    return floor_step


def divergence_only(rows: int, vocab: int, repeats: int, beta: float) -> list[list[str]]:
    """Forward + backward of the masked JSD alone on (rows, vocab) logits, as
    in one step: distillkit's ``masked_divergence`` and the floor's plain
    formula."""
    import torch

    from distillkit.engine.losses import masked_divergence
    from distillkit.registry import registry

    jsd = registry().divergences["jsd"]
    generator = torch.Generator().manual_seed(0)
    student = torch.randn((8, rows // 8 + 1, vocab), generator=generator)
    teacher = torch.randn((8, rows // 8 + 1, vocab), generator=generator)
    mask = torch.zeros(student.shape[:2], dtype=torch.bool)
    mask[:, 1:] = True

    def library(_: int) -> None:
        logits = student.clone().requires_grad_()
        masked_divergence(jsd, logits, teacher, mask, beta=beta).backward()

    def plain(_: int) -> None:
        logits = student.clone().requires_grad_()
        log_q, log_p = torch.log_softmax(logits[mask], -1), torch.log_softmax(teacher[mask], -1)
        log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
        (beta * (log_p.exp() * (log_p - log_m)).sum(-1) + (1 - beta) * (log_q.exp() * (log_q - log_m)).sum(-1)
         ).mean().backward()

    arms = {"distillkit masked_divergence('jsd')": library, "floor formula (plain autograd)": plain}
    times = _common.interleaved(arms, repeats, warmup=1)
    base = times["floor formula (plain autograd)"]
    return [[name, f"{1000 * statistics.median(v):.1f}", f"{statistics.median(_common.paired_ratios(v, base)):.2f}"]
            for name, v in times.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common.on_policy_arguments(parser, repeats=10)
    parser.add_argument("--floor-sampler", choices=["distillkit", "generate"], default="distillkit")
    args = parser.parse_args()
    setup = _common.on_policy_setup(args)
    import torch

    recipe, tokenizer = setup.recipe, setup.tokenizer
    beta = 0.5
    with tempfile.TemporaryDirectory() as tmp:
        distillkit = _common.StepProbe(_common.trainer_for(setup, "gkd", Path(tmp) / "gkd"))
        options = distillkit.trainer.config.options
        assert options.beta == beta and options.on_policy_fraction == 1.0
        floors = {name: make_floor(copy.deepcopy(setup.student), copy.deepcopy(setup.teacher), tokenizer,
                                   max_new_tokens=recipe.generation.max_new_tokens,
                                   max_length=recipe.data.max_length, lr=recipe.training.lr, beta=beta,
                                   sampler=args.floor_sampler, seed=distillkit.trainer.config.training.seed,
                                   lean=name == LEAN)
                  for name in (FLOOR, LEAN)}
        stats: dict[str, dict[str, list]] = {name: {"sampling": [], "tokens": [], "response_tokens": []}
                                             for name in floors}

        def floor_arm(name: str):
            def run(k: int) -> None:
                prompts = [e.prompt_ids for e in distillkit.trainer.examples_for_step(k)]
                out = floors[name](prompts, k)
                for key in stats[name]:
                    stats[name][key].append(out[key])
            return run

        arms = {DISTILLKIT: distillkit.step, **{name: floor_arm(name) for name in floors}}
        print(f"tiny recipe: teacher {_common.parameter_count(setup.teacher) / 1e6:.2f}M, student "
              f"{_common.parameter_count(setup.student) / 1e6:.2f}M params (random weights), vocab {len(tokenizer)}; "
              f"batch 8 Dolly train prompts/step, max_new_tokens {recipe.generation.max_new_tokens}, "
              f"floor sampler: {args.floor_sampler}; repeats {args.repeats} (+1 warm-up)\n")
        times = _common.interleaved(arms, args.repeats, warmup=1,
                                    before=lambda k: torch.manual_seed(args.seed * 1000 + k))

    sampling = {DISTILLKIT: distillkit.sampling[1:], **{name: stats[name]["sampling"][1:] for name in stats}}
    tokens = {DISTILLKIT: (distillkit.tokens[1:], distillkit.response_tokens[1:]),
              **{name: (stats[name]["tokens"][1:], stats[name]["response_tokens"][1:]) for name in stats}}

    def rest(name: str) -> list[float]:  # step time minus sampling
        return [t - u for t, u in zip(times[name], sampling[name])]

    rows = []
    for name, values in times.items():
        s = _common.Summary.of(values)
        rows.append([name, f"{s.median:.3f}", f"{s.mean:.3f} ± {s.sd:.3f}", f"{statistics.median(sampling[name]):.3f}",
                     f"{statistics.median(rest(name)):.3f}", f"{statistics.fmean(tokens[name][0]):.0f}",
                     f"{statistics.fmean(tokens[name][1]):.0f}"])
    print(_common.table(["arm", "median s/step", "mean ± sd s", "sampling s (median)", "rest s (median)",
                         "tokens/step", "response tokens/step"], rows))
    print()
    for name in (FLOOR, LEAN):
        print(_common.ratio_line(f"ratio distillkit / {name} (step time)", times[DISTILLKIT], times[name],
                                 "<= 1.03"))
        print(_common.ratio_line(f"ratio distillkit / {name} (step minus sampling)", rest(DISTILLKIT), rest(name)))
        same = sum(a == b for a, b in zip(zip(*tokens[DISTILLKIT]), zip(*tokens[name])))
        print(f"check: same tokens and response tokens as distillkit in {name} at {same}/{args.repeats} steps")
    rows_n = int(statistics.median(tokens[FLOOR][1]))
    print(f"\ndivergence only: masked JSD(beta={beta}) forward + backward on {rows_n} response rows x {len(tokenizer)} "
          "vocabulary (random logits)")
    print(_common.table(["arm", "median ms", "x floor (median paired)"],
                        divergence_only(rows_n, len(tokenizer), max(args.repeats, 5), beta)))


if __name__ == "__main__":
    main()
