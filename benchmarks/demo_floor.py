"""How far the demo's largest cost, the tiny teacher's SFT step, is from this
machine's floor: the step under ``torch.profiler`` (the share of matrix
products), its work in GFLOP, and the machine's fp32 matrix-product rate.

    python benchmarks/demo_floor.py [--repeats 5] [--threads 2]

Printed: seconds per step (a real ``Trainer.train_step()`` of the tiny
recipe's teacher SFT: sorted micro-batches of 4, as shipped), the step's
work as 6 x parameters x tokens (the body at every position, the LM head at
the response positions only, as the trainer computes it; attention and
padding not counted), GFLOP/s of a 2048^3 product and of the step's MLP
shape, and the top operators by self CPU time.  The teacher's 600 steps
divided by the matrix-product rate is the least time the demo's teacher can
take on this machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402


def matmul_rate(m: int, k: int, n: int, repeats: int) -> float:
    """GFLOP/s of an (m, k) x (k, n) fp32 product (median of ``repeats`` timed calls)."""
    import torch

    a, b = torch.randn(m, k), torch.randn(k, n)
    a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * m * k * n / statistics.median(times) / 1e9


def step_work_gflop(model, examples, batch_size: int) -> float:
    """6 x parameters x tokens per step of ``batch_size`` examples: the body at
    every position, the LM head at the response positions."""
    head = sum(p.numel() for p in model.get_output_embeddings().parameters())
    embeddings = sum(p.numel() for p in model.get_input_embeddings().parameters())
    positions = sum(p.numel() for name, p in model.named_parameters() if name.endswith("wpe.weight"))
    body = sum(p.numel() for p in model.parameters()) - embeddings - positions  # the head is tied to the embeddings
    tokens = statistics.fmean(len(e.prompt_ids) + len(e.response_ids) for e in examples)
    responses = statistics.fmean(len(e.response_ids) for e in examples)
    return batch_size * 6 * (body * tokens + head * responses) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    _common.common_arguments(parser, repeats=5)
    parser.set_defaults(threads=2)
    args = parser.parse_args()
    if args.quick:
        args.repeats = 1
    _common.setup(args.threads, args.seed)
    print(_common.machine_note(args.threads))
    import dataclasses

    from torch.profiler import ProfilerActivity, profile

    from distillkit.config import resolve_run
    from distillkit.training.trainer import Trainer

    setup = _common.tiny_setup([])
    sft = setup.recipe.teacher.sft or {}
    config = resolve_run(setup.recipe, "sft")
    training = dataclasses.replace(config.training, micro_batch_size=sft["micro_batch_size"],
                                   sort_micro_batches=sft["sort_micro_batches"])
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(dataclasses.replace(config, training=training), setup.teacher, setup.tokenizer,
                          setup.train_examples, [], Path(tmp))
        trainer.train_step()  # warm-up
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            trainer.train_step()
            times.append(time.perf_counter() - start)
        with profile(activities=[ProfilerActivity.CPU]) as profiled:
            for _ in range(max(1, args.repeats // 2)):
                trainer.train_step()
    seconds = statistics.median(times)
    work = step_work_gflop(setup.teacher, setup.train_examples, training.batch_size)
    peak = matmul_rate(2048, 2048, 2048, 3)
    rows = [["teacher SFT step (s, median)", f"{seconds:.2f}"],
            ["its work (GFLOP, 6 x parameters x tokens)", f"{work:.1f}"],
            ["its rate (GFLOP/s)", f"{work / seconds:.0f}"],
            ["2048^3 product (GFLOP/s)", f"{peak:.0f}"],
            ["600 x 256 x 1024 product (GFLOP/s)", f"{matmul_rate(600, 256, 1024, 50):.0f}"],
            ["600 teacher steps at the 2048^3 rate (min)", f"{600 * work / peak / 60:.1f}"],
            ["600 teacher steps at the measured step (min)", f"{600 * seconds / 60:.1f}"]]
    print(_common.table(["tiny teacher, batch 16", "value"], rows))
    print(profiled.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
