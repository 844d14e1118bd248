#!/usr/bin/env bash
# The second H100 session of 2026-11-25: GPU tests one file per process (a CUDA error in one cannot
# poison the others), the fast-path bench rows, then ViT-L through train.py. Output in $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/sparsetrain-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 SPARSETRAIN_CACHE=/tmp/sparsetrain-cache
[ -d .whl ] && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
python3 -c "import torch, triton; print(torch.cuda.get_device_name(), 'torch', torch.__version__, 'cusparselt', torch.backends.cusparselt.version(), 'triton', triton.__version__)" | tee "$OUT/env.txt"
for f in tests/test_gpu_fastpath.py tests/test_gpu_semi24.py tests/test_kernels.py tests/test_modules.py; do
  echo "=== $f ($(date +%T))"
  timeout 150 python3 -m pytest -q -ra -m gpu -p no:cacheprovider "$f" > "$OUT/gpu-$(basename $f .py).log" 2>&1
  tail -4 "$OUT/gpu-$(basename $f .py).log"
done
echo "=== bench d,e ($(date +%T))"
timeout 200 python3 scripts/bench.py --only d,e --out "$OUT" > "$OUT/bench.log" 2>&1; tail -30 "$OUT/bench.log"
echo "=== train.py vit_l_24 ($(date +%T))"
for s in semi24 dense; do
  timeout 100 python3 train.py recipe=vit_l_24 sparsity=$s data=synthetic data.batch_size=64 data.train_size=1920 \
    trainer.max_steps=25 trainer.limit_val_batches=2 sched.warmup_steps=5 paths.root=/tmp/runs run_name=$s \
    trainer.enable_progress_bar=false > "$OUT/train-vitl-$s.log" 2>&1
  python3 -c "import json,sys; s=json.load(open(sys.argv[1])); print('$s', s['images_per_second'], s['global_step'], [l['backend'] for l in s['layers'] if l['pattern']!='dense'][:2])" /tmp/runs/vit_l_24/$s/summary.json
done
