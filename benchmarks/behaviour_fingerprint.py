"""Behaviour fingerprint of every method: the logged metrics (losses, gradient
norms, learning rates, validation scores per step) and the sha256 of every
tensor saved by a short fixed run, so that a change meant to keep behaviour
(e.g. the package redesign, issue 14) can be checked to reproduce it bit for bit.

    python benchmarks/behaviour_fingerprint.py --write benchmarks/behaviour-fingerprint.json
    python benchmarks/behaviour_fingerprint.py --check benchmarks/behaviour-fingerprint.json

The run: `distillkit train` on a 6-step recipe of 1-layer models (``SHORT_RUN_RECIPE``),
one process, a fresh cache.  Timings (``tokens_per_s``) are left out.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from _common import SHORT_RUN_RECIPE, cli_environment
from safetensors.torch import load_file

METHODS = ["sft", "kd", "seqkd", "gkd", "promptkd", "minillm"]
SAVED = ["checkpoints/step-0000006/model.safetensors", "checkpoints/step-0000006/run_state_0.safetensors",
         "best/model.safetensors"]


def _tensor_hashes(path: Path) -> dict[str, str]:
    return {key: hashlib.sha256(tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()[:16]
            for key, tensor in sorted(load_file(path).items())}


def fingerprint(method: str, recipe: Path, work: Path) -> dict[str, object]:
    run = work / method
    command = [sys.executable, "-m", "distillkit", "train", "--method", method, "--recipe", str(recipe),
               "--output", str(run)]
    subprocess.run(command, env=cli_environment(work / "cache"), check=True, capture_output=True)
    metrics = [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"}
               for line in (run / "metrics.jsonl").read_text().splitlines()]
    tensors = {name: _tensor_hashes(run / name) for name in SAVED if (run / name).is_file()}
    return {"metrics": metrics, "tensors": tensors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(METHODS))
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", type=Path, help="record the fingerprint into this JSON file")
    mode.add_argument("--check", type=Path, help="compare with a recorded fingerprint; exit 1 on a difference")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fingerprint-"))
    recipe = work / "short-run.toml"
    recipe.write_text(SHORT_RUN_RECIPE)
    found = {method: fingerprint(method, recipe, work) for method in args.methods.split(",")}
    if args.write:
        args.write.write_text(json.dumps(found, indent=1) + "\n")
        print(f"wrote the fingerprint of {', '.join(found)} to {args.write}")
        return
    recorded = json.loads(args.check.read_text())
    differing = [method for method in found if found[method] != recorded.get(method)]
    for method in found:
        verdict = "bit-identical" if method not in differing else f"DIFFERENT ({_gap(found[method], recorded.get(method))})"
        print(f"{method}: {verdict}")
    sys.exit(1 if differing else 0)


def _gap(found: dict, recorded: dict | None) -> str:
    """How far a differing fingerprint is from the recorded one: the largest relative difference of the logged
    values (a rounding-level change shows ~1e-7), or why they cannot be compared."""
    if recorded is None:
        return "not recorded"
    steps = [(a, b) for a, b in zip(found["metrics"], recorded["metrics"])]
    if len(found["metrics"]) != len(recorded["metrics"]) or any(a.keys() != b.keys() for a, b in steps):
        return "other logged metrics"
    pairs = [(a[key], b[key]) for a, b in steps for key in a if isinstance(a[key], float)]
    gap = max((abs(x - y) / max(abs(y), 1e-12) for x, y in pairs), default=0.0)
    return f"logged values: largest relative difference {gap:.1e} over {len(pairs)}; saved tensors " \
           f"{'equal' if found['tensors'] == recorded['tensors'] else 'differ'}"


if __name__ == "__main__":
    main()
