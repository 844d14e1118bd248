#!/usr/bin/env bash
# What the code does that no device run has measured yet, in batches of at most ~560 s (output in $OUT).
# Run the stages in order on one warm machine; each writes its logs and reports under $OUT.
#   bash scripts/gpu_pending.sh 1   every GPU test (one process per file); bench_block mlp + profile (the fused
#                                   block MLP node vs layer by layer, issue #6)
#   bash scripts/gpu_pending.sh 2   bench b, c, d, f, g (issue #5: the in-place prune + flip count, host time,
#                                   MLP block, activation 2:4 on the fused kernel, inference incl. the library's
#                                   eval-mode SparseLinear)
#   bash scripts/gpu_pending.sh 3   bench i, 2:4 and dense: train.py vs the bare loop, eager and cuda_graph=true
#                                   (forward+backward replayed from captured graphs)
#   bash scripts/gpu_pending.sh 4   bench h (the ViT-L step compiled, with our graph, and reduce-overhead); bench i
#                                   under compile=reduce-overhead; host profile of eager train.py
#   bash scripts/gpu_pending.sh 5   the ResNet-50 accuracy rows still owed (issue #4), 8 runs side by side:
#                                   blocks re-picked every step at 90% (magnitude ste, DRESS), GMP at 80%, and
#                                   dense on the same device (the 2:4 rows and the 80% magnitude/DRESS rows
#                                   were run on the CPU, results/accuracy.md). Needs data/fashion-mnist (a copy of
#                                   /usr/share/datasets/fashion-mnist) and .snap/src.tar (git archive -o
#                                   .snap/src.tar HEAD) carried too; the runs come back as $OUT/runs.tgz.
#   bash scripts/gpu_pending.sh all [SECONDS]
#                                   stages 1-3 in one call, most wanted first (GPU tests, train.py eager vs
#                                   cuda_graph, the fused block MLP, bench b-d,f,g), each capped so the whole
#                                   ends within SECONDS (default 570): what a start-starved session can afford.
#   bash scripts/gpu_pending.sh trainpy [SECONDS]
#                                   issue #5's last row after the progress-bar change (train/loss and train/acc no
#                                   longer synced each step without a bar): bench i, 2:4 and dense, cuda_graph and
#                                   eager; then a timeline of the 2:4 step without Python stacks, to see what
#                                   idle is left (scripts/profile_timeline.py).
#   bash scripts/gpu_pending.sh graphs [SECONDS]
#                                   what decides `cuda_graph`'s default: every GPU test (graphed training vs eager
#                                   among them; capped at 250 s), then train.py 2:4 eager vs cuda_graph; then
#                                   the block MLP step (issue #6) with the block index built outside the graph.
# Carry .whl (../shared/gpu/wheels.sh) for hydra/omegaconf, which the device image lacks.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/sparsetrain-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 SPARSETRAIN_CACHE=/tmp/sparsetrain-cache
[ -d .whl ] && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
python3 -c "import torch, triton; print(torch.cuda.get_device_name(), 'torch', torch.__version__, 'cusparselt', torch.backends.cusparselt.version(), 'triton', triton.__version__)" | tee "$OUT/env.txt"

budget=${2:-}; [ -z "$budget" ] && case "${1:-1}" in all|graphs|trainpy) budget=570 ;; *) budget=100000 ;; esac
deadline=$(( $(date +%s) + budget ))  # stage `all` shares one call's limit between its steps
capped() {  # seconds: the smaller of this step's own limit and what is left before the deadline
  local left=$(( deadline - $(date +%s) - 5 )); echo $(( left < $1 ? left : $1 ))
}

timed_step() {  # title, own time limit, log file, lines of it to show, command...: run it within the deadline
  local title=$1 limit; limit=$(capped "$2"); local log=$3 lines=$4; shift 4
  if [ "$limit" -lt 30 ]; then echo "=== $title: not run (${limit}s left)"; return; fi
  echo "=== $title ($(date +%T), up to ${limit}s)"
  timeout "$limit" "$@" > "$log" 2>&1
  grep -E "^  |FAILED|Error|error" "$log" | cut -c1-260 | tail -"$lines"
}

bench() {  # sections, time limit, other bench.py arguments
  local tag=${1//,/}  # one folder per call: reports are named by the minute they start
  timed_step "bench $1" "$2" "$OUT/bench-$tag.log" 45 python3 scripts/bench.py ${3:-} --only "$1" --out "$OUT/bench-$tag"
}

gpu_tests() {  # optional: seconds the whole test pass may take (default: up to the deadline)
  local until=$(( deadline - 5 )); [ -n "${1:-}" ] && until=$(( $(date +%s) + $1 < until ? $(date +%s) + $1 : until ))
  GPU_TEST_FILE_SECONDS=150 GPU_TESTS_DEADLINE=$until bash scripts/gpu_tests.sh
}

bench_block_mlp() {
  timed_step "bench_block mlp,profile" 170 "$OUT/bench-block.log" 30 \
    python3 scripts/bench_block.py --only mlp,profile --out "$OUT/bench-block"
}

case "${1:-1}" in
  all) gpu_tests $(( budget * 45 / 100 < 260 ? budget * 45 / 100 : 260 ))
       bench i 300 "--train-modes eager,cuda-graph"
       bench_block_mlp
       bench b,c,d,f,g 200 --quick
       # At most 8 files come back from a call: the bench logs and reports travel as one archive.
       (cd "$OUT" && tar -czf bench.tgz bench-* && rm -rf bench-*) ;;
  trainpy) bench i 360 "--train-modes cuda-graph,eager"
           timed_step "timeline train.py 2:4, cuda_graph, no stacks" 150 "$OUT/timeline.log" 30 \
             python3 scripts/profile_timeline.py /tmp/timeline semi24-graph trainpy --no-stack -- recipe=vit_l_24 \
             sparsity=semi24 data=synthetic data.batch_size=64 data.train_size=2560 data.num_workers=6 \
             trainer.limit_val_batches=1 trainer.enable_progress_bar=false logger=csv paths.root=/tmp/timeline-runs \
             cuda_graph=true
           cp /tmp/timeline/timeline-*.txt "$OUT/" 2>/dev/null
           (cd "$OUT" && tar -czf bench.tgz bench-* && rm -rf bench-*) ;;
  graphs) gpu_tests 250
          bench i 300 "--quick --train-modes eager,cuda-graph"
          bench_block_mlp
          (cd "$OUT" && tar -czf bench.tgz bench-* && rm -rf bench-*) ;;
  1) gpu_tests
     bench_block_mlp ;;
  2) bench b,c,d,f,g 520 --quick ;;
  3) bench i 540 "--train-modes eager,cuda-graph" ;;
  4) bench h 250 --quick
     bench i 160 "--quick --train-modes reduce-overhead"
     echo "=== profile train.py ($(date +%T))"
     timeout 150 python3 scripts/profile_host.py trainpy --top 40 -- recipe=vit_l_24 data=synthetic \
       data.batch_size=64 data.train_size=1920 data.num_workers=6 trainer.max_steps=30 trainer.limit_val_batches=1 \
       trainer.enable_progress_bar=false logger=csv paths.root=/tmp/profile-runs > "$OUT/profile-trainpy.txt" 2>&1
     grep -E "ncalls|^ +[0-9]" "$OUT/profile-trainpy.txt" | head -40 ;;
  5) mkdir -p /usr/share/datasets && cp -r data/fashion-mnist /usr/share/datasets/
     bash scripts/gpu_accuracy.sh 0 540 none --model resnet --jobs 10 \
       --only dense,block80_gmp,block90_mag,block90_dress ;;
  *) echo "usage: bash scripts/gpu_pending.sh all|graphs|trainpy [SECONDS] | 1|2|3|4|5" >&2; exit 2 ;;
esac
