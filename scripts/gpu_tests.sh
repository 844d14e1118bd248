#!/usr/bin/env bash
# Every GPU-marked test, one pytest process per file (a CUDA error in one file cannot poison the
# others), on the device. Prints a summary line per file; the logs come back as $OUT/gpu-tests.tgz.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/sparsetrain-out}; logs=/tmp/gpu-test-logs; mkdir -p "$OUT" "$logs"
export PYTHONUNBUFFERED=1 SPARSETRAIN_CACHE=/tmp/sparsetrain-cache
# The device image lacks hydra/omegaconf: carry .whl (made by ../shared/gpu/wheels.sh) and install it here.
[ -d .whl ] && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
python3 -c "import torch, triton; print(torch.cuda.get_device_name(), 'torch', torch.__version__, 'cuda', torch.version.cuda, 'cusparselt', torch.backends.cusparselt.version(), 'triton', triton.__version__)" | tee "$logs/env.txt"
# GPU_TESTS_DEADLINE (epoch seconds, optional): no file starts or runs past it, so a caller can share one call's limit.
deadline=${GPU_TESTS_DEADLINE:-$(( $(date +%s) + 100000 ))}
for f in $(grep -lE "pytest\.mark\.gpu" tests/test_*.py); do
  name=$(basename "$f" .py)
  limit=$(( deadline - $(date +%s) )); [ "$limit" -gt "${GPU_TEST_FILE_SECONDS:-240}" ] && limit=${GPU_TEST_FILE_SECONDS:-240}
  if [ "$limit" -lt 10 ]; then echo "$f: not run (the caller's deadline passed)"; continue; fi
  timeout "$limit" python3 -m pytest -q -ra -m gpu -p no:cacheprovider "$f" > "$logs/$name.log" 2>&1
  echo "$f (rc $?): $(tail -1 "$logs/$name.log")"
done | tee "$logs/summary.txt"
cp "$logs/summary.txt" "$OUT/gpu-tests-summary.txt"
tar -czf "$OUT/gpu-tests.tgz" -C /tmp gpu-test-logs
