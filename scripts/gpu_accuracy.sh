#!/usr/bin/env bash
# Fashion-MNIST accuracy runs on one H100, many small runs side by side: the accuracy grid's
# methods and the block recipe study (held-out data). Runs from a snapshot of a commit
# (.snap/src.tar, made by `git archive`), so edits in the working tree do not leak into results.
#   usage on the device: bash scripts/gpu_accuracy.sh STUDY_SECONDS GRID_SECONDS STUDY_VARIANTS [accuracy_table args...]
# STUDY_VARIANTS: comma-separated variants of scripts/block_recipe_study.py.
# The run directories (no checkpoints) come back as $OUT/runs.tgz.
set -uo pipefail
study_s=$1; grid_s=$2; study_only=$3; shift 3
OUT=${OUT:-/tmp/sparsetrain-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
# The data module reads Debian's path by default; the device has no apt package, so place the files there.
mkdir -p /usr/share/datasets/fashion-mnist && cp data/fashion-mnist/*.gz /usr/share/datasets/fashion-mnist/
rm -rf /tmp/snap && mkdir -p /tmp/snap && tar -xf .snap/src.tar -C /tmp/snap && cd /tmp/snap
[ -f "$OLDPWD/.snap/runs.tgz" ] && tar -xzf "$OLDPWD/.snap/runs.tgz"  # earlier calls' finished runs
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
echo "=== grid and study side by side $(date +%T)"
if [ "$grid_s" -gt 0 ]; then
  timeout "$grid_s" python3 scripts/accuracy_table.py --jobs 13 "$@" > "$OUT/grid.log" 2>&1 &
fi
if [ "$study_s" -gt 0 ]; then
  timeout "$study_s" python3 scripts/block_recipe_study.py --jobs 4 --only "$study_only" > "$OUT/study.log" 2>&1 &
fi
wait
echo "=== done $(date +%T)"
cp results/block-recipe-study.md runs/accuracy/accuracy.md "$OUT/" 2>/dev/null
tar --exclude='*.ckpt' --exclude='masks' -czf "$OUT/runs.tgz" runs
