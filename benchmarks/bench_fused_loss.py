"""Loss-path memory and time at large vocabularies: today's dense logits
against the response-only, chunked path with closed-form gradients.

    python benchmarks/bench_fused_loss.py [--vocab 49152 262144] [--losses kd gkd] [--repeats 3]

One KD loss (0.5 CE + 0.5 forward KL) and one GKD loss (JSD, beta = 0.5) and
their backward, from final hidden states (B, T, H) of a student (trainable,
with its output layer) and a teacher (no grad), B = 8, T = 512, H = 576
(SmolLM2-135M's width), random weights, a response mask of half the
positions (the second half of each row, as a prompt + response):

- ``dense`` (the path before issue 17): the output layer on every position,
  (B, T, V) logits for both models, then the masked loss per token in
  checkpointed 1,024-row chunks (``masked_token_divergences`` /
  ``masked_token_logprobs`` at ``chunk_size = 1024``, which is what
  ``masked_divergence`` / ``masked_cross_entropy`` did), mean, backward;
- ``fused``: ``ResponseLogits`` of the response positions for both models
  and ``masked_objective`` (one pass over the chunks, gradients computed
  with the values, closed forms for CE, KL and JSD), backward.

Memory: each (arm, loss, V) runs in a fresh subprocess (with
``MALLOC_MMAP_THRESHOLD_=65536``, so freed tensors leave the resident set)
that builds the inputs, resets its peak resident set (``/proc/self/clear_refs``),
runs the loss and its backward once and reports the peak resident set above
that baseline (VmHWM) and the bytes autograd saved for backward
(``saved_tensors_hooks``; each storage once, the inputs and weights not
counted).  Time: both arms in this
process, interleaved, median of paired ratios (see ``_common``).  The
values and gradients of the two arms are compared too.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from distillkit.api import LossTerm, ResponseLogits
from distillkit.builtins.divergences import BUILTIN_DIVERGENCES
from distillkit.engine.losses import masked_objective, masked_token_divergences, masked_token_logprobs

DIVERGENCES = {d.name: d for d in BUILTIN_DIVERGENCES}
B, T, H = 8, 512, 576


def inputs(vocab: int, seed: int = 0) -> dict[str, object]:
    g = torch.Generator().manual_seed(seed)
    student_head = torch.nn.Linear(H, vocab, bias=False)
    teacher_head = torch.nn.Linear(H, vocab, bias=False).requires_grad_(False)
    with torch.no_grad():
        student_head.weight.normal_(0, 0.05, generator=g)
        teacher_head.weight.normal_(0, 0.05, generator=g)
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[:, T // 2:] = True
    return {"student_hidden": torch.randn(B, T, H, generator=g).requires_grad_(), "student_head": student_head,
            "teacher_hidden": torch.randn(B, T, H, generator=g), "teacher_head": teacher_head, "mask": mask,
            "labels": torch.randint(0, vocab, (B, T), generator=g), "vocab": vocab}


def dense_loss(kind: str, x: dict) -> torch.Tensor:
    student = x["student_head"](x["student_hidden"])
    with torch.no_grad():
        teacher = x["teacher_head"](x["teacher_hidden"])
    mask = x["mask"]
    if kind == "gkd":
        return masked_token_divergences(DIVERGENCES["jsd"], student, teacher, mask, chunk_size=1024).mean()
    ce = -masked_token_logprobs(student, x["labels"], mask, chunk_size=1024).mean()
    kl = masked_token_divergences(DIVERGENCES["forward_kl"], student, teacher, mask, chunk_size=1024).mean()
    return 0.5 * ce + 0.5 * kl


def fused_loss(kind: str, x: dict) -> torch.Tensor:
    mask, vocab = x["mask"], x["vocab"]
    student = ResponseLogits(x["student_hidden"][mask], x["student_head"], vocab)
    teacher = ResponseLogits(x["teacher_hidden"][mask], x["teacher_head"], vocab)
    terms = {"jsd": LossTerm(1.0, "jsd", teacher)} if kind == "gkd" else \
        {"ce": LossTerm(0.5), "kl": LossTerm(0.5, "forward_kl", teacher)}
    return masked_objective(student, terms, x["labels"], mask, DIVERGENCES.__getitem__)["loss"]


ARMS = {"dense": dense_loss, "fused": fused_loss}


def peak_rss_mib() -> float:
    """The process's peak resident set (VmHWM) since the last :func:`reset_peak_rss`."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5": reset the peak resident set to the current one
        f.write("5")


def measure_memory(arm: str, kind: str, vocab: int) -> dict[str, float]:
    """Run in a fresh process: peak RSS above the built inputs, and autograd's saved bytes, of one loss + backward."""
    x = inputs(vocab)
    saved: dict[int, int] = {}  # storage -> bytes: a tensor saved twice counts once; the inputs not at all
    inputs_storage = {t.untyped_storage().data_ptr() for t in (x["student_hidden"], x["teacher_hidden"],
                                                              x["student_head"].weight, x["teacher_head"].weight)}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in inputs_storage:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    reset_peak_rss()
    baseline = peak_rss_mib()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = ARMS[arm](kind, x)
    loss.backward()
    return {"peak_above_inputs_mib": peak_rss_mib() - baseline, "saved_mib": sum(saved.values()) / 2**20,
            "loss": float(loss.detach())}


def memory_in_subprocess(arm: str, kind: str, vocab: int) -> dict[str, float]:
    out = subprocess.run([sys.executable, __file__, "--memory-of", arm, kind, str(vocab)], check=True,
                         capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def timed(arm: str, kind: str, x: dict) -> tuple[float, float, torch.Tensor, torch.Tensor]:
    for tensor in (x["student_hidden"], x["student_head"].weight):
        tensor.grad = None
    started = time.perf_counter()
    loss = ARMS[arm](kind, x)
    loss.backward()
    return time.perf_counter() - started, float(loss.detach()), x["student_hidden"].grad.clone(), \
        x["student_head"].weight.grad.clone()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, nargs="+", default=[49152, 262144])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--losses", nargs="+", choices=["kd", "gkd"], default=["kd", "gkd"])
    parser.add_argument("--memory-of", nargs=3, metavar=("ARM", "KIND", "VOCAB"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.memory_of:
        arm, kind, vocab = args.memory_of
        print(json.dumps(measure_memory(arm, kind, int(vocab))))
        return
    print(f"torch {torch.__version__}, {os.cpu_count()} CPU cores (shared), torch threads 1, 1-min load average "
          f"at start {os.getloadavg()[0]:.2f}; B={B}, T={T}, H={H}, response positions {B * T // 2} of {B * T}, "
          f"repeats {args.repeats} (+1 warm-up), commit {_commit()}\n")
    print("| loss | V | arm | peak RSS above inputs MiB | autograd saved MiB | median s | fused/dense time "
          "(median paired) |")
    print("|---|---|---|---|---|---|---|")
    for vocab in args.vocab:
        x = inputs(vocab)
        for kind in args.losses:
            memory = {arm: memory_in_subprocess(arm, kind, vocab) for arm in ARMS}
            seconds: dict[str, list[float]] = {arm: [] for arm in ARMS}
            results = {}
            for repeat in range(args.repeats + 1):
                order = list(ARMS) if repeat % 2 == 0 else list(reversed(ARMS))
                for arm in order:
                    elapsed, value, grad_hidden, grad_head = timed(arm, kind, x)
                    results[arm] = (value, grad_hidden, grad_head)
                    if repeat:
                        seconds[arm].append(elapsed)
            ratio = statistics.median(f / d for f, d in zip(seconds["fused"], seconds["dense"]))
            for arm in ARMS:
                m, relative = memory[arm], f"{ratio:.3f}" if arm == "fused" else "1"
                print(f"| {kind} | {vocab:,} | {arm} | {m['peak_above_inputs_mib']:,.0f} | {m['saved_mib']:,.0f} | "
                      f"{statistics.median(seconds[arm]):.2f} | {relative} |")
            (dv, dh, dw), (fv, fh, fw) = results["dense"], results["fused"]
            print(f"|  |  | check | values {dv:.6f} vs {fv:.6f}; max |grad diff| hidden "
                  f"{(dh - fh).abs().max():.2e}, head {(dw - fw).abs().max():.2e} |  |  |  |", flush=True)
        del x


def _commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parent)
    return out.stdout.strip() or "unknown"


if __name__ == "__main__":
    main()
