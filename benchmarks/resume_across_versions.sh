#!/usr/bin/env bash
# Resume across versions: a run folder written by distillkit at REV is resumed by
# the working tree's distillkit, and its final weights are compared with an
# uninterrupted run of the working tree (bit for bit).
#
#   benchmarks/resume_across_versions.sh REV [METHOD ...]     (default: all six)
#
# Each method trains the 6-step test recipe (tests/conftest.py) with a
# checkpoint every 3 steps, first at REV (installed into a scratch folder
# from a git worktree); its step-6 checkpoint is removed, so the working
# tree resumes from step 3.  One fresh cache for all runs.
set -euo pipefail
rev=${1:?usage: $0 REV [METHOD ...]}; shift
methods=${*:-sft kd seqkd gkd promptkd minillm}
repo=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-$repo/.venv/bin/python}
work=$(mktemp -d)
trap 'git -C "$repo" worktree remove --force "$work/old" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
git -C "$repo" worktree add --detach "$work/old" "$rev" >/dev/null
"$python" -m pip install -q --no-deps --no-build-isolation --target "$work/site" "$work/old" >/dev/null 2>&1
(cd "$repo/tests" && "$python" -c "from conftest import TINY_RECIPE; print(TINY_RECIPE.format(steps=6, eval_every=3))") \
    > "$work/recipe.toml"
export OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 DISTILLKIT_CACHE_DIR="$work/cache"
export DISTILLKIT_DATA_DIR=${DISTILLKIT_DATA_DIR:-$repo/../shared/data}
train() { "$python" -m distillkit train --recipe "$work/recipe.toml" --set training.save_every=3 "$@" >/dev/null 2>&1; }
for method in $methods; do
  (cd "$work" && PYTHONPATH="$work/site" train --method "$method" --output "$work/$method-old")
  rm -rf "$work/$method-old/checkpoints/step-0000006"
  (cd "$repo" && train --method "$method" --output "$work/$method-old" --resume)
  (cd "$repo" && train --method "$method" --output "$work/$method-new")
  "$python" - "$work/$method-old" "$work/$method-new" "$method" <<'PY'
import sys
from safetensors.torch import load_file
old, new, method = sys.argv[1:]
a, b = (load_file(f"{run}/checkpoints/step-0000006/model.safetensors") for run in (old, new))
same = a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)
print(f"{method}: {'bit-identical' if same else 'DIFFERENT'}")
PY
done
