#!/usr/bin/env bash
# Issue #5 on the lent H100, in two batches that each fit one 300 s call (output in $OUT):
#   bash scripts/gpu_issue5.sh 1   GPU tests of the compile path and fast path; bench c,f,g,h
#   bash scripts/gpu_issue5.sh 2   GPU tests of the 2:4 backend and modules; bench i (train.py), p (profile)
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

bench() {  # sections, time limit
  echo "=== bench $1 ($(date +%T))"
  timeout "$2" python3 scripts/bench.py --only "$1" --out "$OUT" > "$OUT/bench-$1.log" 2>&1
  grep -E "^  |FAILED|Error|error" "$OUT/bench-$1.log" | cut -c1-260 | tail -45
}

case "${1:-1}" in
  1) gpu_tests 70 tests/test_gpu_compile.py tests/test_gpu_fastpath.py
     bench c,f,g,h 185 ;;
  2) gpu_tests 40 tests/test_gpu_semi24.py tests/test_modules.py
     bench i,p 230 ;;
esac
