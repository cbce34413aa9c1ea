"""Length-sorted micro-batches (``training.sort_micro_batches``) against one
padded batch per step, side by side: the tiny recipe's steps at batch 16.

    python benchmarks/bench_micro_batches.py [--repeats N] [--quick] [--threads T]

Arms: a real ``Trainer.train_step()`` of the tiny recipe's teacher SFT (its
4.3M-parameter teacher, the demo's largest cost) and of its KD step (the
0.95M student with the teacher's forward pass), with the step's 16 examples
in one micro-batch (the recipe as shipped), or sorted by length and cut
into micro-batches of 8, 4 or 2.  Step k of every arm trains on the same
16 Dolly examples (the trainer's examples for step k), so the arms differ
only in how the step is cut; each arm's update is the same up to float
round-off (tests/test_training.py).  Printed: median ms per step, the
paired ratio to the one-batch arm, and the padded share of the positions.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

SPLITS = (16, 8, 4, 2)  # micro-batch sizes; 16 = the whole step, unsorted


def arms_for(setup: _common.TinySetup, method: str, folder: Path) -> dict[str, tuple[object, list[float]]]:
    """One trainer per split (copies of the same weights), with the padded share of each step's positions."""
    import dataclasses

    from distillkit.config import resolve_run
    from distillkit.training.trainer import Trainer

    arms = {}
    model = setup.teacher if method == "sft" else setup.student  # the demo's teacher SFT, or its KD student
    for size in SPLITS:
        config = resolve_run(setup.recipe, method)
        training = dataclasses.replace(config.training, batch_size=16, micro_batch_size=size,
                                       sort_micro_batches=size < 16)
        trainer = Trainer(dataclasses.replace(config, training=training), copy.deepcopy(model), setup.tokenizer,
                          setup.train_examples, [], folder / f"{method}-{size}",
                          teacher=copy.deepcopy(setup.teacher) if method != "sft" else None)
        padding: list[float] = []
        source = trainer.source

        def recording(examples, source=source, padding=padding):
            batch = source(examples)
            padding.append(1 - float(batch.attention_mask.sum()) / batch.attention_mask.numel())
            return batch
        trainer.source = recording
        arms[f"{method}, micro-batch {size}" + (" sorted" if size < 16 else " (as shipped)")] = (trainer, padding)
    return arms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    _common.common_arguments(parser, repeats=8)
    args = parser.parse_args()
    if args.quick:
        args.repeats = 2
    _common.setup(args.threads, args.seed)
    print(_common.machine_note(args.threads))
    setup = _common.tiny_setup([])
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for method in ("sft", "kd"):
            arms = arms_for(setup, method, Path(tmp))

            def step(trainer):
                def run(k: int) -> None:
                    trainer.state.step = trainer.run.step = k
                    trainer.train_step()
                return run
            times = _common.interleaved({name: step(trainer) for name, (trainer, _) in arms.items()}, args.repeats)
            base = times[next(iter(arms))]
            for name, (_, padding) in arms.items():
                rows.append([name, f"{1000 * statistics.median(times[name]):.0f}",
                             f"{statistics.median(_common.paired_ratios(times[name], base)):.2f}",
                             f"{100 * statistics.fmean(padding):.0f}%"])
        print(f"tiny recipe, batch 16 Dolly training examples per step, {args.repeats} timed steps per arm "
              "(after one warm-up), interleaved")
        print(_common.table(["arm", "ms/step (median)", "time / as shipped (paired median)", "padded positions"],
                            rows))


if __name__ == "__main__":
    main()
