#!/usr/bin/env bash
# One batched run on a CUDA machine: the GPU tests (each GPU path held to its masked-dense reference),
# then real recipes through train.py on the GPU. Logs and summaries land in $OUT.
#   bash scripts/gpu_check.sh            (expects hydra importable; .whl/ wheels are installed if present)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/sparsetrain-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 SPARSETRAIN_CACHE=/tmp/sparsetrain-cache
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
step() { echo "=== $* ($(date +%T))"; }

step environment
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, triton, lightning, timm; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'cusparselt', torch.backends.cusparselt.version(), 'triton', triton.__version__, 'lightning', lightning.__version__,
'timm', timm.__version__)"

step "GPU tests"
python3 -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tee "$OUT/gpu-tests.log" | tail -25

FMNIST=${FMNIST_ROOT:-data/fashion-mnist}
run() {  # name, then train.py args
  local name=$1; shift
  step "train.py $name: $*"
  python3 train.py "$@" paths.root=/tmp/runs run_name="$name" trainer.enable_progress_bar=false \
    > "$OUT/train-$name.log" 2>&1
  echo "exit $?"; grep -E "backend|layers are sparse|Error|error" "$OUT/train-$name.log" | head -8
  find /tmp/runs -path "*/$name/summary.json" -exec cp {} "$OUT/summary-$name.json" \; \
    -exec python3 -c "import json,sys; s=json.load(open(sys.argv[1])); print({k: s[k] for k in ('metrics','global_step','images_per_second','device')})" {} \;
}
run fmnist24 recipe=fmnist_vit_24 data.root="$FMNIST" data.num_workers=4 trainer.precision=bf16-mixed
run fmnistdense recipe=fmnist_dense data.root="$FMNIST" data.num_workers=4 trainer.precision=bf16-mixed
run vitl24 recipe=vit_l_24 data=synthetic data.img_size=224 data.batch_size=64 data.train_size=3200 \
  trainer.max_steps=40 trainer.limit_val_batches=2 sched.warmup_steps=5
run vitldense recipe=vit_l_24 sparsity=dense data=synthetic data.img_size=224 data.batch_size=64 \
  data.train_size=3200 trainer.max_steps=40 trainer.limit_val_batches=2 sched.warmup_steps=5
