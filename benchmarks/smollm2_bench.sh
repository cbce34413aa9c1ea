#!/usr/bin/env bash
# Issue 19's smollm2 bench on the reduced protocol of RESULTS.md ("The protocol the smollm2 bench runs on"),
# resumable across sessions and machines through the committed results.json.
#
#   benchmarks/smollm2_bench.sh run METHODS [OPTION...]   # train and evaluate METHODS (comma-separated) into
#                                             # $BENCH, from a frozen snapshot of HEAD, niced, in the background;
#                                             # OPTIONs go to `distillkit bench` (a sweep point: --set KEY=VALUE)
#   benchmarks/smollm2_bench.sh tables        # copy $BENCH/results.json into benchmarks/bench-smollm2 and write
#                                             # the tables and plots there, a row per registered method ("—"
#                                             # where none yet); trains nothing
#   benchmarks/smollm2_bench.sh exposure-bias METHOD   # add $BENCH/METHOD's student to the committed report in
#                                             # benchmarks/exposure-bias-smollm2 (about 20 min)
#
# `run` starts from benchmarks/bench-smollm2/results.json when $BENCH has none, so finished rows are kept and only
# the named methods that lack a row are trained. Progress: $BENCH/METHOD/metrics.jsonl and train.log; the bench's
# own log ($BENCH/bench.log) is written at the end. Stop it with: pkill -TERM -f "distillkit bench --recipe smollm2"
# A sweep point (its own recipe overrides) is an experiment of its own: give it a NAME, and pass its OPTIONs to every
# `run`. Its tables and report are committed beside the main ones, with the suffix -NAME, and hold its rows only:
#   NAME=teacher-sft benchmarks/smollm2_bench.sh run gkd,promptkd --set 'teacher.sft={}'
# Environment: NAME (default none: the main bench), BENCH (default runs/bench/smollm2-reduced, or
# runs/bench/smollm2-NAME), PYTHON (default .venv/bin/python), DISTILLKIT_DATA_DIR
# (default ../shared/data), DISTILLKIT_CACHE_DIR (the recipe's caches: the de-quantised teacher, the student's
# SFT start).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
suffix=${NAME:+-$NAME}
committed=$repo/benchmarks/bench-smollm2$suffix
exposure_bias=$repo/benchmarks/exposure-bias-smollm2$suffix
bench=$(realpath -m "${BENCH:-$repo/runs/bench/smollm2${suffix:--reduced}}")
python=$(realpath -s "${PYTHON:-$repo/.venv/bin/python}")  # -s: a venv's python is a link that must stay one
export OMP_WAIT_POLICY=PASSIVE DISTILLKIT_DATA_DIR=${DISTILLKIT_DATA_DIR:-$(realpath -m "$repo/../shared/data")}

case "${1:-}" in
run)
    methods=${2:?usage: $0 run METHODS (comma-separated) [OPTION...]}
    commit=$(git -C "$repo" rev-parse --short HEAD)
    snapshot=$bench/snapshot-$commit
    if [ ! -d "$snapshot/site" ]; then  # the code the bench imports, unchanged while the working tree moves on
        git -C "$repo" worktree add --detach "$snapshot/tree" HEAD
        "$python" -m pip install -q --no-deps --no-build-isolation --target "$snapshot/site" \
            "$snapshot/tree" "$snapshot/tree/examples/distillkit-akl"
        git -C "$repo" worktree remove --force "$snapshot/tree"
    fi
    mkdir -p "$bench"
    [ -f "$bench/results.json" ] || [ ! -f "$committed/results.json" ] || cp "$committed/results.json" "$bench/"
    cd "$bench"  # not the repository, so that `python -m distillkit` imports the snapshot
    PYTHONPATH=$snapshot/site nohup nice -n 15 "$python" -m distillkit bench --recipe smollm2 --methods "$methods" \
        --data dolly,selfinst,vicuna,sni,unni --subset selfinst=100 --subset sni=100 --seeds 10,20,30 \
        --output "$bench" "${@:3}" > "$bench/bench.log" 2>&1 &
    echo "bench of $methods at $commit started (pid $!): $bench"
    ;;
tables)
    mkdir -p "$committed"
    cp "$bench/results.json" "$committed/results.json"
    "$python" - "$committed" "$bench" "${NAME:-}" <<'PY'
import sys
from pathlib import Path

from distillkit.bench import BenchConfig, Results, write_tables
from distillkit.config.run_folder import read_run_file
from distillkit.registry import registry

paper = ["sft", "kd", "seqkd", "gkd", "minillm", "promptkd"]  # Table 1's methods, then every other registered one
methods = paper + [name for name in registry().methods.names() if name not in paper]
output, bench, sweep = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
results = Results(output / "results.json")
if sweep:  # a sweep point's rows only; the main bench has a row per method, "—" until it is trained
    methods = [name for name in methods if name in results.data["train"]]
config = BenchConfig("smollm2", methods, ["dolly", "selfinst", "vicuna", "sni", "unni"], [10, 20, 30], output,
                     subsets={"selfinst": 100, "sni": 100})  # the protocol `run` passes to the bench
for method, row in results.data["train"].items():  # a row trained by a snapshot older than recorded settings
    if "settings" not in row and (record := read_run_file(bench / method)) is not None:
        row["settings"] = record.settings  # its run folder, here: the run the row was measured on
results.save()
tables = write_tables(config, results)
print(tables["quality"], tables["cost"], sep="\n\n")
PY
    ;;
exposure-bias)
    method=${2:?usage: $0 exposure-bias METHOD}
    [ -d "$bench/$method/best" ] || { echo "no trained $method in $bench (run it first)" >&2; exit 1; }
    work=$bench/exposure-bias
    mkdir -p "$work"
    mkdir -p "$exposure_bias"  # the students measured so far, if any: the new one is added to them
    [ ! -f "$exposure_bias/exposure_bias.json" ] || cp "$exposure_bias/exposure_bias.json" "$work/"
    cd "$bench"
    nice -n 15 "$python" -m distillkit analyze exposure-bias --teacher "$(realpath "$bench/$method/teacher")" \
        --student "$bench/$method" --label "$method" --data dolly --limit 100 --max-length 50 --samples 3 --seed 10 \
        --output "$work"
    cp "$work/exposure_bias.json" "$work/exposure_bias.png" "$exposure_bias/"
    ;;
*)
    sed -n '2,24p' "$0"
    exit 2
    ;;
esac
