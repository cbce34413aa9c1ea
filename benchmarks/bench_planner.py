"""The memory planner's estimate against the measured peak of real training
steps on CPU.

    python benchmarks/bench_planner.py [--steps N] [--cases tiny:sft,tiny:kd,...]

Each case runs through the real pipeline (``distillkit.training.pipeline.train``:
recipe, tokenizer, data, models, ``Trainer``) in a fresh subprocess, after a
first subprocess has prepared the cached artefacts (the teacher's SFT, the SFT
student init, the de-quantised GGUF), so nothing but the run itself is built.
Measured:

- baseline: the resident set size (``/proc/self/status`` VmRSS) once the
  tokenizer and data are loaded and the modelling modules imported, just
  before the models are built;
- peak: the process's peak resident set (``ru_maxrss``, reset through
  ``/proc/self/clear_refs`` once the models are built, so the loading
  transient is reported apart) during ``--steps`` calls of
  ``Trainer.train_step`` (no evaluation or checkpoint);
- measured = peak - baseline: weights, AdamW states, gradients, activations,
  logits, sampling, plus whatever the CPU runtime keeps (allocator, thread
  pools).

The subprocesses run with ``MALLOC_MMAP_THRESHOLD_=65536``: glibc then maps
every tensor of 64 KiB or more on its own and returns it to the system when
freed, so the resident size follows the live tensors (the PyTorch profiler's
allocation timeline of a tiny-recipe step agreed with it to 0.5 MiB).

The estimate is the planner's peak for one CPU process (everything it counts)
with the sequence length and response tokens of the longest micro-batch the
steps saw, instead of its worst case (``data.max_length``, every position a
response token).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

CASES = {
    # case: (recipe, method, overrides); short SFT stages keep the preparation cheap (memory does not depend on them)
    "tiny:sft": ("tiny", "sft", []),
    "tiny:kd": ("tiny", "kd", ["teacher.sft.max_steps=20"]),
    "tiny:gkd": ("tiny", "gkd", ["teacher.sft.max_steps=20", "student.sft.max_steps=20"]),
    "tiny:promptkd": ("tiny", "promptkd", ["teacher.sft.max_steps=20", "student.sft.max_steps=20"]),
    "tiny:minillm": ("tiny", "minillm", ["teacher.sft.max_steps=20", "student.sft.max_steps=20"]),
    "smollm2:sft": ("smollm2", "sft", []),
    "smollm2:kd": ("smollm2", "kd", []),
    "smollm2:promptkd": ("smollm2", "promptkd", ["student.sft.max_steps=2"]),
}
MiB = 2**20


def _status(field: str) -> float:
    """A /proc/self/status field in MiB."""
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024


def worker(case: str, steps: int, prepare_only: bool) -> dict:
    """Run one case in this process and return the measurements and the estimate."""
    import torch

    from distillkit.config import load_recipe
    from distillkit.engine.layout import single_layout
    from distillkit.planning.plan import estimate
    from distillkit.training import pipeline
    from distillkit.training.trainer import Trainer

    torch.set_num_threads(2)
    recipe_name, method, overrides = CASES[case]
    output = Path(tempfile.mkdtemp()) / "run"
    record: dict = {"case": case, "steps": steps}
    opened = pipeline.open_session

    def open_session(*args, **kwargs):
        session = opened(*args, **kwargs)
        import transformers.models.gpt2.modeling_gpt2  # noqa: F401  the modelling code counts as imports
        import transformers.models.llama.modeling_llama  # noqa: F401

        record["baseline_mib"] = _status("VmRSS")
        return session

    def fit(self):
        if self.output_dir != output:  # an SFT stage of the preparation
            return fitted(self)
        if prepare_only:
            return output
        record["built_mib"], record["load_peak_mib"] = _status("VmRSS"), _status("VmHWM")
        Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
        shapes = []
        batches_of = self.micro_batches

        def micro_batches(examples):
            batches = batches_of(examples)
            shapes.extend((tuple(b.input_ids.shape), int(b.label_mask.sum())) for b in batches)
            return batches

        self.micro_batches = micro_batches
        for _ in range(steps):
            self.train_step()
            self.state.step += 1
            self.run.step = self.state.step
        record["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        record["sequence"] = max(shape[1] for shape, _ in shapes)
        record["response_tokens"] = max(tokens for _, tokens in shapes)
        record["micro_batch"] = max(shape[0] for shape, _ in shapes)
        return output

    fitted = Trainer.fit
    pipeline.open_session, Trainer.fit = open_session, fit
    pipeline.train(method, recipe_name, output=output, overrides=overrides, max_steps=steps)
    if prepare_only:
        return record
    plan = estimate(load_recipe(recipe_name, overrides), method, single_layout(), sequence_length=record["sequence"],
                    response_tokens=record["response_tokens"])
    record["estimate_mib"] = plan.needed()
    record["rows"] = [[row.name, row.when, round(row.device + row.cpu, 1)] for row in plan.rows]
    record["peak_phase"] = plan.peak_phase()
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3, help="measured optimizer steps per case (default 3)")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of: {', '.join(CASES)}")
    parser.add_argument("--json", type=Path, help="also write the records to this file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps, args.prepare)))
        return
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "HF_HUB_OFFLINE": "1"}  # otherwise as `distillkit train`
    env.setdefault("DISTILLKIT_DATA_DIR", _common.DEFAULT_DATA_DIR)
    records = []
    for case in args.cases.split(","):
        command = [sys.executable, __file__, "--worker", case, "--steps", str(args.steps)]
        for extra in (["--prepare"], []):
            done = subprocess.run(command + extra, env=env, capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"{case} failed:\n{done.stderr[-3000:]}")
        record = json.loads(done.stdout.strip().splitlines()[-1])
        records.append(record)
        print(f"{case}: measured {record['peak_mib'] - record['baseline_mib']:,.0f} MiB, "
              f"estimate {record['estimate_mib']:,.0f} MiB", file=sys.stderr)
    rows = []
    for r in records:
        measured = r["peak_mib"] - r["baseline_mib"]
        rows.append([r["case"], str(r["steps"]), f"{r['micro_batch']} x {r['sequence']} ({r['response_tokens']})",
                     f"{r['built_mib'] - r['baseline_mib']:,.0f}", f"{r['load_peak_mib'] - r['baseline_mib']:,.0f}",
                     f"{measured:,.0f}", f"{r['estimate_mib']:,.0f}", f"{r['estimate_mib'] / measured:.2f}"])
    print(_common.table(["case", "steps", "longest micro-batch B x T (response tokens)", "after build (MiB)",
                         "loading peak (MiB)", "measured peak (MiB)", "planner (MiB)", "planner / measured"], rows))
    print("\nMiB above the baseline (tokenizer, data and modules loaded, no model); "
          f"{_common.machine_note(2)}")
    if args.json:
        args.json.write_text(json.dumps(records, indent=2) + "\n")


if __name__ == "__main__":
    main()
