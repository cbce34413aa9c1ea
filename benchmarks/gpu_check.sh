#!/usr/bin/env bash
# The GPU check: one prepared script for one CUDA GPU, under 8 minutes, that
# installs and downloads nothing.
#
#   benchmarks/gpu_check.sh OUT_DIR [--cpu-smoke] [gpu_check.py options ...]
#
# 1. the CUDA test subset (the tests whose code paths touch the device; there
#    is no cuda marker): tests/test_planning.py tests/test_sampling.py
#    tests/test_fused_losses.py tests/test_divergences.py, -x, under
#    `timeout` (GPU_CHECK_PYTEST_S, default 180 s); log in OUT_DIR/pytest.log;
# 2. benchmarks/gpu_check.py (see its docstring): bf16 steps/s and peak
#    torch.cuda.max_memory_allocated of SFT/KD/GKD/PromptKD/MiniLLM on the
#    tiny and smollm2 recipes, the memory planner's estimate beside each peak,
#    distillkit's sampler vs HF generate tokens/s; it writes
#    OUT_DIR/gpu_check.json and OUT_DIR/gpu_check.md (after every case, so a
#    run cut short keeps what it measured).  Its time budget is what is left
#    of GPU_CHECK_TOTAL_S (default 460 s) after the tests, at most 420 s.
#
# --cpu-smoke (passed through to the driver): the same code on the CPU, tiny
# recipe only, one timed step, and only tests/test_divergences.py; how the
# script is tested on a machine without a GPU.  Without it the script stops
# with one line when torch.cuda is unavailable.
#
# Environment: PYTHON (default .venv/bin/python), DISTILLKIT_DATA_DIR (the
# Dolly data; default shared/data or ../shared/data beside the repository),
# DISTILLKIT_CACHE_DIR (the de-quantised SmolLM2 lands there, ~540 MB; keep
# it out of OUT_DIR).  Exit status: the driver's when it fails (1: some case
# failed), else the tests'.
set -euo pipefail
out=${1:?usage: $0 OUT_DIR [--cpu-smoke] [gpu_check.py options ...]}; shift
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
python=${PYTHON:-.venv/bin/python}
smoke=0
for arg in "$@"; do [[ $arg == --cpu-smoke ]] && smoke=1; done
fail() { echo "gpu_check: $*" >&2; exit 2; }

command -v "$python" >/dev/null 2>&1 || fail "no Python at '$python' (set PYTHON=...; this script installs nothing)"
if [[ -z ${DISTILLKIT_DATA_DIR:-} ]]; then
  for candidate in "$repo/shared/data" "$repo/../shared/data"; do
    [[ -d $candidate/databricks-dolly-15k ]] && { DISTILLKIT_DATA_DIR=$(cd "$candidate" && pwd); break; }
  done
fi
[[ -d ${DISTILLKIT_DATA_DIR:-}/databricks-dolly-15k ]] \
  || fail "no Dolly data: set DISTILLKIT_DATA_DIR to the folder holding databricks-dolly-15k/ (got '${DISTILLKIT_DATA_DIR:-}')"
export DISTILLKIT_DATA_DIR OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE} HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
  HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
if (( ! smoke )); then
  "$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null \
    || fail "torch.cuda is not available ($("$python" -c 'import torch; print("torch", torch.__version__)' 2>&1 | tail -1)); run with --cpu-smoke to test on a CPU"
fi
mkdir -p "$out"
start=$SECONDS
total=${GPU_CHECK_TOTAL_S:-460}

# 1. the CUDA test subset
if (( smoke )); then
  tests=(tests/test_divergences.py)
else
  tests=(tests/test_planning.py tests/test_sampling.py tests/test_fused_losses.py tests/test_divergences.py)
fi
echo "gpu_check: pytest ${tests[*]}" >&2
pytest_rc=0
timeout --kill-after=10 "${GPU_CHECK_PYTEST_S:-180}" \
  "$python" -m pytest -q -p no:cacheprovider "${tests[@]}" -x >"$out/pytest.log" 2>&1 || pytest_rc=$?
echo "gpu_check: pytest rc $pytest_rc ($((SECONDS - start)) s): $(grep -E ' (passed|failed|error)' "$out/pytest.log" | tail -1)" >&2

# 2. the measurements, in what is left of the total
budget=$(( total - (SECONDS - start) - 40 ))
(( budget > 420 )) && budget=420
(( budget < 60 )) && budget=60
driver_rc=0
timeout --kill-after=10 $(( budget + 60 )) \
  "$python" benchmarks/gpu_check.py --output "$out" --budget-s "$budget" --pytest-log "$out/pytest.log" \
  --pytest-rc "$pytest_rc" "$@" || driver_rc=$?
echo "gpu_check: driver rc $driver_rc; $((SECONDS - start)) s in all; wrote $out/gpu_check.json and $out/gpu_check.md" >&2
(( driver_rc )) && exit "$driver_rc"
exit "$pytest_rc"
