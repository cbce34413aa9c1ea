"""Cost of a PromptKD step relative to a GKD step, side by side, both through
distillkit's real ``Trainer.train_step``.

    python benchmarks/bench_promptkd.py [--repeats N] [--quick]

Same tiny-recipe setup for both (random-weight teacher and student built from
the recipe's configs, tokenized Dolly training rows, batch_size =
micro_batch_size = 8), same sampling settings (GKD with
``on_policy_fraction = 1.0``, so both sample the student every step), the
same prompts and RNG seed at step k.  Per step:

- GKD: sample; teacher forward (no grad); student forward + backward (JSD).
- PromptKD: sample once; prompt step = prompted teacher forward + backward to
  the soft prompt, student forward (no grad), plain teacher forward (no grad);
  student step = prompted teacher forward (no grad), student forward +
  backward (reverse KL).

The table splits each step into sampling, teacher forward passes and the rest
(student passes, divergences, every backward -- the prompt step's backward
through the teacher included -- and the optimizers).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common.on_policy_arguments(parser, repeats=8)
    args = parser.parse_args()
    setup = _common.on_policy_setup(args)
    import torch

    d_model = setup.teacher.config.n_embd
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        probes = {"GKD (lambda = 1)": _common.StepProbe(_common.trainer_for(setup, "gkd", Path(tmp) / "gkd")),
                  "PromptKD": _common.StepProbe(_common.trainer_for(setup, "promptkd", Path(tmp) / "promptkd"))}
        gkd, promptkd = probes["GKD (lambda = 1)"].trainer, probes["PromptKD"].trainer
        assert gkd.config.options.on_policy_fraction == 1.0
        for k in range(args.repeats + 1):  # the two trainers draw the same examples at every step
            prompts = [[e.prompt_ids for e in t.examples_for_step(k)] for t in (gkd, promptkd)]
            assert prompts[0] == prompts[1], f"the two trainers draw different examples at step {k}"
        prompt_params = sum(p.numel() for p in promptkd.run.teacher.trainable_parameters())
        prompt_length = promptkd.config.options.prompt_length
        teacher_time = {name: [] for name in probes}
        for name, probe in probes.items():  # seconds in teacher passes (instance-level wrapper, behaviour unchanged)
            stack.enter_context(_common.timed_calls(probe.trainer.run.teacher, "logits", teacher_time[name]))
        teacher_calls = {name: len(teacher_time[name]) for name in probes}
        teacher_per_step = {name: [] for name in probes}

        def arm(name: str):
            def run(k: int) -> None:
                before = len(teacher_time[name])
                probes[name].step(k)
                teacher_per_step[name].append(sum(teacher_time[name][before:]))
                teacher_calls[name] = len(teacher_time[name]) - before
            return run

        print(f"tiny recipe: teacher {_common.parameter_count(setup.teacher) / 1e6:.2f}M (d_model {d_model}), student "
              f"{_common.parameter_count(setup.student) / 1e6:.2f}M params (random weights); batch 8 Dolly train "
              f"prompts/step, max_new_tokens {args.max_new_tokens}; "
              f"repeats {args.repeats} (+1 warm-up)\n")
        times = _common.interleaved({name: arm(name) for name in probes}, args.repeats, warmup=1,
                                    before=lambda k: torch.manual_seed(args.seed * 1000 + k))

    rows = []
    for name, values in times.items():
        probe = probes[name]
        sampling, teacher = probe.sampling[1:], teacher_per_step[name][1:]
        rest = [t - s - u for t, s, u in zip(values, sampling, teacher)]
        s = _common.Summary.of(values)
        rows.append([name, f"{s.median:.3f}", f"{s.mean:.3f} ± {s.sd:.3f}", f"{statistics.median(sampling):.3f}",
                     f"{statistics.median(teacher):.3f} ({teacher_calls[name]})", f"{statistics.median(rest):.3f}",
                     f"{statistics.fmean(probe.tokens[1:]):.0f}", f"{statistics.fmean(probe.response_tokens[1:]):.0f}"])
    print(_common.table(["arm", "median s/step", "mean ± sd s", "sampling s", "teacher forwards s (calls)",
                         "rest s", "tokens/step", "response tokens/step"], rows))
    print()
    print(_common.ratio_line("ratio PromptKD / GKD (step time)",
                             times["PromptKD"], times["GKD (lambda = 1)"],
                             "<= 1.10; paper 1.06"))
    print(f"soft prompt: {prompt_params} trainable parameters = {prompt_length} x d_model {d_model} "
          f"({'ok' if prompt_params == prompt_length * d_model else 'MISMATCH'})")


if __name__ == "__main__":
    main()
