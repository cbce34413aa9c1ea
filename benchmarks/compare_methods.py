"""Train several methods on one recipe with the same budget and compare them
on ROUGE-L (and wall time), side by side in one run.

    python benchmarks/compare_methods.py --recipe tiny --methods sft,kd,seqkd,gkd,promptkd --seeds 10,20,30

Finished runs are reused (each method trains into OUTPUT/METHOD with
--resume semantics), so a killed comparison continues where it stopped.
Prints a Markdown table and writes it to OUTPUT/results.md and .json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from rich.console import Console

from distillkit.evaluation import evaluate_model_dir
from distillkit.pipeline import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="tiny")
    parser.add_argument("--methods", default="sft,kd,seqkd,gkd,promptkd")
    parser.add_argument("--seeds", default="10,20,30")
    parser.add_argument("--data", default="dolly", help="evaluation set (its test split)")
    parser.add_argument("--limit", type=int, default=0, help="evaluate on the first N examples only")
    parser.add_argument("--output", type=Path, default=None, help="default: runs/compare/RECIPE")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="recipe override key=value")
    args = parser.parse_args()
    console = Console(stderr=True)
    output = args.output or Path("runs") / "compare" / args.recipe
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    teacher_dir = None
    for method in args.methods.split(","):
        started = time.perf_counter()
        train(method, args.recipe, output=output / method, overrides=args.overrides, resume=True, console=console)
        seconds = time.perf_counter() - started
        link = output / method / "teacher"
        teacher_dir = link.resolve() if link.exists() else teacher_dir
        report = evaluate_model_dir(output / method, args.data, seeds=seeds, limit=args.limit, notice=console.print)
        rows.append({"method": method, **report, "train_seconds": seconds})
        console.print(f"{method}: ROUGE-L {report['mean']:.2f} ± {report['std']:.2f} (train {seconds / 60:.1f} min)")
    if teacher_dir is not None:
        rows.insert(0, {"method": "teacher", **evaluate_model_dir(teacher_dir, args.data, seeds=seeds,
                                                                   limit=args.limit), "train_seconds": None})
    lines = [f"ROUGE-L on {args.data} ({rows[-1]['examples']} examples), mean ± std over seeds {args.seeds}; "
             f"recipe `{args.recipe}`", "",
             "| model | ROUGE-L | " + " | ".join(f"seed {s}" for s in seeds) + " | train wall time |",
             "|---|---|" + "---|" * len(seeds) + "---|"]
    for row in rows:
        wall = "cached" if row["train_seconds"] is None else f"{row['train_seconds'] / 60:.1f} min"
        lines.append(f"| {row['method']} | {row['mean']:.2f} ± {row['std']:.2f} | "
                     + " | ".join(f"{row['rougeL'][str(s)]:.2f}" for s in seeds) + f" | {wall} |")
    table = "\n".join(lines)
    print(table)
    output.mkdir(parents=True, exist_ok=True)
    (output / "results.md").write_text(table + "\n")
    (output / "results.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
