"""Cost of MiniLLM relative to GKD and PromptKD, side by side, all through
distillkit's real ``Trainer.train_step``.

    python benchmarks/bench_minillm.py [--repeats N] [--quick]

Same tiny-recipe setup for the three arms (random-weight teacher and student
built from the recipe's configs, tokenized Dolly training rows,
batch_size = micro_batch_size = 8, the same sampling settings and the same
examples at step k).  MiniLLM collects ``rollout_size`` = 32 teacher-mixed
rollouts and makes ``ppo_epochs`` = 4 passes over them, 4 steps a pass, so
one repeat is one whole rollout cycle of 16 optimizer steps for every arm
and the step time is its mean over the cycle.  Per step:

- GKD (lambda = 1): sample 8 from the student; teacher forward; student
  forward + backward (JSD).
- PromptKD: sample 8; prompt step; student step (see bench_promptkd.py).
- MiniLLM: every 16 steps, sample 32 with the teacher mixed in at each token
  plus one no-grad scoring pass of each model (the teacher's logits are
  kept for the 4 passes); per step, a student forward + backward on 8
  rollouts (PPO + single-step reverse KL) and on the step's 8 dataset rows
  (L_PT, with a teacher forward).

Peak memory: each arm runs one cycle in its own process, which samples its
resident set size every 2 ms; reported is the peak during the steps minus
the resident size before the first step (models, data and optimizer set up).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

ROLLOUT_SIZE, PPO_EPOCHS, BATCH = 32, 4, 8
CYCLE = ROLLOUT_SIZE * PPO_EPOCHS // BATCH  # optimizer steps per rollout collection
ARMS = {"GKD (lambda = 1)": "gkd", "PromptKD": "promptkd", "MiniLLM": "minillm"}


def _setup(args: argparse.Namespace) -> _common.TinySetup:
    return _common.on_policy_setup(args, (f"methods.minillm.rollout_size={ROLLOUT_SIZE}",
                                          f"methods.minillm.ppo_epochs={PPO_EPOCHS}"))


def _rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * 4096 / 2**20


def peak_memory(args: argparse.Namespace) -> None:
    """Child process: one cycle of one arm; prints {"baseline_mb", "peak_mb"}."""
    setup = _setup(args)
    with tempfile.TemporaryDirectory() as tmp:
        probe = _common.StepProbe(_common.trainer_for(setup, args.memory_arm, Path(tmp) / "arm"))
        peak, done = [0.0], threading.Event()

        def watch() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], _rss_mb())
                time.sleep(0.002)

        baseline = _rss_mb()
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        for k in range(CYCLE):
            probe.step(k)
        done.set()
        watcher.join()
    print(json.dumps({"baseline_mb": baseline, "peak_mb": max(peak[0], _rss_mb())}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common.on_policy_arguments(parser, repeats=3)
    parser.add_argument("--memory-arm", help=argparse.SUPPRESS)  # internal: the child process of one arm
    args = parser.parse_args()
    if args.memory_arm:
        return peak_memory(args)
    setup = _setup(args)
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        probes = {name: _common.StepProbe(_common.trainer_for(setup, method, Path(tmp) / method))
                  for name, method in ARMS.items()}
        for k in range(CYCLE):  # the three trainers draw the same examples at every step
            drawn = {tuple(tuple(e.prompt_ids) for e in p.trainer.examples_for_step(k)) for p in probes.values()}
            assert len(drawn) == 1, f"the trainers draw different examples at step {k}"
        sampled = {name: [] for name in probes}

        def arm(name: str):
            def cycle(repeat: int) -> None:
                probe = probes[name]
                before = len(probe.sampling)
                for j in range(CYCLE):
                    probe.step(repeat * CYCLE + j)
                sampled[name].append(sum(probe.sampling[before:]))
            return cycle

        print(f"tiny recipe: teacher {_common.parameter_count(setup.teacher) / 1e6:.2f}M, student "
              f"{_common.parameter_count(setup.student) / 1e6:.2f}M params (random weights); batch {BATCH} Dolly "
              f"train prompts/step, max_new_tokens {args.max_new_tokens}; MiniLLM rollout_size {ROLLOUT_SIZE}, "
              f"ppo_epochs {PPO_EPOCHS}: one repeat = one cycle of {CYCLE} steps per arm; "
              f"repeats {args.repeats} (+1 warm-up)\n")
        times = _common.interleaved({name: arm(name) for name in probes}, args.repeats, warmup=1,
                                    before=lambda r: torch.manual_seed(args.seed * 1000 + r))

    memory = {}
    for name, method in ARMS.items():
        child = subprocess.run([sys.executable, __file__, "--memory-arm", method, "--threads", str(args.threads),
                                "--seed", str(args.seed), "--max-new-tokens", str(args.max_new_tokens)],
                               capture_output=True, text=True, check=True)
        memory[name] = json.loads(child.stdout.strip().splitlines()[-1])

    per_step = {name: [t / CYCLE for t in values] for name, values in times.items()}
    rows = []
    for name, values in per_step.items():
        s = _common.Summary.of(values)
        sequences = CYCLE * BATCH if name != "MiniLLM" else ROLLOUT_SIZE
        extra = memory[name]["peak_mb"] - memory[name]["baseline_mb"]
        rows.append([name, f"{s.median:.3f}", f"{s.mean:.3f} ± {s.sd:.3f}",
                     f"{statistics.median(sampled[name][1:]) / CYCLE:.3f}", f"{sequences / CYCLE:.0f}",
                     f"{memory[name]['baseline_mb']:.0f}", f"{extra:.0f}"])
    print(_common.table(["arm", "median s/step", "mean ± sd s/step", "sampling s/step", "sequences sampled/step",
                         "RSS before steps MB", "peak RSS above it MB"], rows))
    print()
    for other in ("GKD (lambda = 1)", "PromptKD"):
        print(_common.ratio_line(f"ratio MiniLLM / {other} (step time)", per_step["MiniLLM"], per_step[other],
                                 "paper 3.4x GKD" if other.startswith("GKD") else ""))
    gkd_extra = memory["GKD (lambda = 1)"]["peak_mb"] - memory["GKD (lambda = 1)"]["baseline_mb"]
    for name in ("PromptKD", "MiniLLM"):
        extra = memory[name]["peak_mb"] - memory[name]["baseline_mb"]
        print(f"peak memory above the set-up state, {name} / GKD: {extra / gkd_extra:.2f}"
              + ("   [paper 1.6x GKD]" if name == "MiniLLM" else ""))


if __name__ == "__main__":
    main()
