#!/usr/bin/env bash
# Issue #5 on the lent H100, in batches of at most ~560 s (output in $OUT):
#   bash scripts/gpu_issue5.sh 1   GPU tests of the compile path and fast path; bench c,f,g,h
#   bash scripts/gpu_issue5.sh 2   bench c,f again (after fixes), i (train.py, 2:4 eager), p (profile)
#   bash scripts/gpu_issue5.sh 3   every GPU test; bench b, c, d (after the flip count moved into the prune
#                                  kernel), f (activation 2:4 on the fused kernel)
#   bash scripts/gpu_issue5.sh 4   bench i (train.py vs bare loop, eager and reduce-overhead); host profile
#                                  of train.py
#   bash scripts/gpu_issue5.sh 5   bench h (the ViT-L step compiled, with our graph, and reduce-overhead)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/sparsetrain-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 SPARSETRAIN_CACHE=/tmp/sparsetrain-cache
[ -d .whl ] && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
python3 -c "import torch, triton; print(torch.cuda.get_device_name(), 'torch', torch.__version__, 'cusparselt', torch.backends.cusparselt.version(), 'triton', triton.__version__)" | tee "$OUT/env.txt"

gpu_tests() {  # one process per file: a CUDA error in one cannot poison the others
  local limit=$1; shift
  for f in "$@"; do
    echo "=== $f ($(date +%T))"
    timeout "$limit" python3 -m pytest -q -ra -m gpu -p no:cacheprovider "$f" > "$OUT/gpu-$(basename "$f" .py).log" 2>&1
    tail -3 "$OUT/gpu-$(basename "$f" .py).log"
  done
}

bench() {  # sections, time limit, other bench.py arguments
  echo "=== bench $1 ($(date +%T))"
  local tag=${1//,/}  # one folder per call: reports are named by the minute they start
  timeout "$2" python3 scripts/bench.py ${3:-} --only "$1" --out "$OUT/bench-$tag" > "$OUT/bench-$tag.log" 2>&1
  grep -E "^  |FAILED|Error|error" "$OUT/bench-$tag.log" | cut -c1-260 | tail -45
}

case "${1:-1}" in
  1) gpu_tests 70 tests/test_gpu_compile.py tests/test_gpu_fastpath.py
     bench c,f,g,h 185 ;;
  2) bench c,f 35
     bench i 80 --quick
     bench p 30 --quick ;;
  3) bash scripts/gpu_tests.sh
     bench b,c,d,f 170 --quick ;;
  4) bench i 330 "--quick --train-modes eager,reduce-overhead"
     echo "=== profile train.py ($(date +%T))"
     timeout 150 python3 scripts/profile_host.py trainpy --top 40 -- recipe=vit_l_24 data=synthetic \
       data.batch_size=64 data.train_size=1920 data.num_workers=6 trainer.max_steps=30 trainer.limit_val_batches=1 \
       trainer.enable_progress_bar=false logger=csv paths.root=/tmp/profile-runs > "$OUT/profile-trainpy.txt" 2>&1
     grep -E "ncalls|^ +[0-9]" "$OUT/profile-trainpy.txt" | head -60 ;;
  5) bench h 400 --quick ;;
esac
