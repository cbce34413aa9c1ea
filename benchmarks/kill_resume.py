"""Kill/resume matrix: every method, SIGKILLed at several points of a real
`distillkit train` process, then `--resume`d; is the result bit-identical to
an uninterrupted run?

    python benchmarks/kill_resume.py [--methods sft,kd,...] [--points mid-step,first-checkpoint,checkpoint]

Kill points (training 6 steps, a checkpoint every 2):
- ``mid-step``: after step 3 is logged, i.e. during step 4 (resumes from step 2);
- ``first-checkpoint``: while ``step-0000002.tmp`` is being written (no complete checkpoint yet: starts over);
- ``checkpoint``: while ``step-0000004.tmp`` is being written (resumes from step 2).

For each cell it prints whether the process was killed at that point, whether
the final weights and run state equal the uninterrupted run's to the bit, and
whether every step is logged once with the same losses.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import SHORT_RUN_RECIPE, cli_environment
from safetensors.torch import load_file

METHODS = ["sft", "kd", "seqkd", "gkd", "promptkd", "minillm"]
POINTS = {
    "mid-step": lambda run: _logged_step(run) >= 3,
    "first-checkpoint": lambda run: (run / "checkpoints" / "step-0000002.tmp").exists(),
    "checkpoint": lambda run: (run / "checkpoints" / "step-0000004.tmp").exists(),
}


def _logged_step(run: Path) -> int:
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return 0
    return max((json.loads(line)["step"] for line in lines if line.strip()), default=0)


def _train(recipe: Path, method: str, run: Path, env: dict[str, str], *, resume: bool = False,
           kill_when=None) -> bool:
    """Run `distillkit train`; with ``kill_when(run)``, SIGKILL it once that holds. Returns whether it was killed."""
    command = [sys.executable, "-m", "distillkit", "train", "--method", method, "--recipe", str(recipe),
               "--output", str(run), *(["--resume"] if resume else [])]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while kill_when is not None and process.poll() is None:
        if kill_when(run):
            process.send_signal(signal.SIGKILL)
            process.wait()
            return True
        time.sleep(0.002)
    if process.wait() != 0:
        raise RuntimeError(f"{' '.join(command)} exited {process.returncode}")
    return False


def _final_state(run: Path) -> dict[str, object]:
    final = run / "checkpoints" / "step-0000006"
    state = {f"model/{k}": v for k, v in load_file(final / "model.safetensors").items()}
    if (final / "run_state_0.safetensors").is_file():
        state.update({f"run_state/{k}": v for k, v in load_file(final / "run_state_0.safetensors").items()})
    return state


def _losses(run: Path) -> list[tuple[int, float | None]]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r.get("loss", r.get("student/loss"))) for r in records if "val/rougeL" not in r]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--points", default=",".join(POINTS))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kill-resume-"))
    recipe = work / "short-run.toml"
    recipe.write_text(SHORT_RUN_RECIPE)
    env = cli_environment(work / "cache")
    print("| method | kill point | killed there | final weights and run state | metrics |")
    print("|---|---|---|---|---|")
    for method in args.methods.split(","):
        straight = work / method / "straight"
        _train(recipe, method, straight, env)
        want, want_losses = _final_state(straight), _losses(straight)
        for point in args.points.split(","):
            run = work / method / point
            killed = _train(recipe, method, run, env, kill_when=POINTS[point])
            _train(recipe, method, run, env, resume=True)
            got, losses = _final_state(run), _losses(run)
            identical = got.keys() == want.keys() and all(bool((got[k] == want[k]).all()) for k in want)
            print(f"| {method} | {point} | {'yes' if killed else 'no (finished first)'} | "
                  f"{'bit-identical' if identical else 'DIFFERENT'} | "
                  f"{'each step once, same losses' if losses == want_losses else 'DIFFERENT'} |", flush=True)


if __name__ == "__main__":
    main()
