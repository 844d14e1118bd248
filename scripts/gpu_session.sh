#!/usr/bin/env bash
# One batched run on the lent GPU machine: versions, cuSPARSELt's rule for groups with zeros,
# the GPU tests of the kernels, kernel tuning, then scripts/bench.py. Everything lands in $OUT.
#
#   bash scripts/gpu_session.sh [bench args...]      e.g.  --quick   or   --only a,b
#   SKIP_TESTS=1 SKIP_TUNE=1 SKIP_PROBE=1 bash scripts/gpu_session.sh --only d,e
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/sparsetrain-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 SPARSETRAIN_CACHE=${SPARSETRAIN_CACHE:-/tmp/sparsetrain-cache}
PY=${PY:-python3}
step() { echo "=== $* ($(date +%T))"; }

step environment
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'cusparselt', torch.backends.cusparselt.version(), 'triton', triton.__version__)"

if [ -n "${PROBE_ZEROS:-}" ]; then
step "probe: which slots _cslt_compress stores for groups with fewer than 2 nonzeros"
$PY - <<'EOF'
# Every group of 4 with at most 2 nonzeros, zeros of both signs: does cuSPARSELt store the
# nonzeros plus the lowest-index zeros (the kernel's rule, and layout_sm90's), with -0 a zero?
import itertools, torch
from sparsetrain.sparse.layout_sm90 import _nibble_positions
combos = [c for c in itertools.product("n+-", repeat=4) if c.count("n") <= 2]
m, k = 64, 64
w = torch.zeros(m, k // 4, 4, dtype=torch.bfloat16)
for idx in range(m * k // 4):
    c = combos[idx % len(combos)]
    for s, kind in enumerate(c):
        w.view(-1, 4)[idx, s] = {"n": 1.0 + idx % 7 + s, "+": 0.0, "-": -0.0}[kind]
w = w.view(m, k).cuda()
comp = torch._cslt_compress(w).view(-1)
meta = comp[m * k // 2:].view(torch.uint8)
stream = torch.stack([meta & 0xF, meta >> 4], -1).reshape(-1)
nib = stream[_nibble_positions(m, k, w.device)].view(-1).cpu()
vals = comp[: m * k // 2].view(torch.int16).view(-1, 2).cpu()
bits = w.view(-1, 4).view(torch.int16).cpu()
bad = 0
for idx in range(m * k // 4):
    nz = [s for s in range(4) if bits[idx, s] & 0x7FFF]
    want = (nz + [s for s in range(4) if s not in nz])[:2] if len(nz) < 2 else nz
    want = sorted(want)
    got = [int(nib[idx]) & 3, int(nib[idx]) >> 2]
    got_vals = vals[idx].tolist()
    want_vals = [int(bits[idx, want[0]]), int(bits[idx, want[1]])]
    if got != want or got_vals != want_vals:
        bad += 1
        if bad <= 20:
            print("MISMATCH", combos[idx % len(combos)], "stored slots", got, "values", got_vals,
                  "| rule slots", want, "values", want_vals)
print(f"zero-group rule: {bad} of {m * k // 4} groups differ from 'nonzeros, then lowest-index zeros'")
EOF
fi

step "build the cuSPARSELt plan cache (full compiler output on failure)"
$PY -c "from sparsetrain.kernels import cslt_plans; print(cslt_plans._build())"

if [ -z "${SKIP_TESTS:-}" ]; then
step "GPU tests"
$PY -m pytest -q -m gpu tests/test_kernels.py -p no:cacheprovider 2>&1 | tail -40
fi

if [ -z "${SKIP_TUNE:-}" ]; then
step "kernel tuning: store order (v1 shuffled / v2 natural) x warps, 4096x1024 bf16, weights cycled past L2"
$PY - <<'EOF'
import sys, torch
sys.path.insert(0, "scripts")
from bench import Timer
from sparsetrain.kernels import prune_compress as pc
t = Timer(quick=False)
m, k = 4096, 1024
ws = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in range(12)]
ref = None
floor = {"prune+mask": m * k * 2 + 2 * m * k * 9 // 8 + m * k, "values": m * k * 2 + 2 * m * k * 9 // 8}
for coalesce in (False, True):
    for warps in (2, 4):
        pc.COALESCE, pc.NUM_WARPS = coalesce, warps
        out = pc.prune_compress_transposable(ws[0])
        same = ref is None or all(torch.equal(a, b) for a, b in zip(out, ref))
        ref = ref or out
        for name, fns in {"prune+mask": [lambda w=w: pc.prune_compress_transposable(w) for w in ws],
                          "values": [lambda w=w: pc.compress_pruned(w) for w in ws]}.items():
            ms = [t.graph_ms(fns) for _ in range(2)]  # twice: the spread says what counts as noise
            gbs = floor[name] / (min(ms) * 1e-3) / 1e9
            print(f"coalesce={coalesce} warps={warps} {name:10s} graph ms {ms[0]:.4f} {ms[1]:.4f} "
                  f"({gbs:.0f} GB/s of the minimum bytes) same_bytes_as_first={same}")
pc.COALESCE, pc.NUM_WARPS = True, 2
EOF
fi

step "bench"
$PY scripts/bench.py --out "$OUT" "$@"
step done
