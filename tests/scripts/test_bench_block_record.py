"""scripts/bench_block.py's rows for results/speed.jsonl: every measured figure of a report, named as the record
names them, so scripts/tables.py compares them with the same figures measured before."""
import json
import sys

from tests.helpers import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import bench_block  # noqa: E402

ENV = {"date": "2030-01-02T03:04:05+00:00", "gpu": "GPU", "torch": "2.11", "cusparselt": 800, "triton": "3.6",
       "python": "3.12", "copy_tbs": 3.0, "dense_tflops": 700.0}


def test_a_report_becomes_one_row_per_figure_and_variant():
    report = {"environment": ENV, "sections": {
        "gemm": [{"name": "ViT-L GEMM 1024->4096 forward, 90% sparse, 64x64", "dense_ms": 0.16, "sparse_ms": 0.06,
                  "torch_bsr_ms": 0.2}, {"name": "gemm", "error": "RuntimeError: no"}],
        "profile": [{"name": "profile dense: some_kernel", "us_per_step": 12.5}]}}
    rows = bench_block.record_rows(report, "python scripts/bench_block.py --only gemm", "abc1234")
    seen = {(r["figure"], r["variant"]): r["median"] for r in rows}
    assert seen[("GEMM 1024->4096 forward, 90% sparse, 64x64", "block-sparse (Triton)")] == 0.06
    assert seen[("GEMM 1024->4096 forward, 90% sparse, 64x64", "torch BSR")] == 0.2
    assert seen[(bench_block.PROFILE_FIGURE, "dense: some_kernel")] == 12.5
    assert seen[("device copy rate (read + write)", "copy")] == 3.0 and len(rows) == 6
    assert {r["date"] for r in rows} == {"2030-01-02T03:04"} and {r["commit"] for r in rows} == {"abc1234"}


def test_its_figures_are_the_ones_the_record_already_holds():
    recorded = {(r["model"], r["figure"], r["variant"])
                for r in map(json.loads, (ROOT / "results" / "speed.jsonl").read_text().splitlines())}
    report = {"environment": ENV, "sections": {
        "mlp": [{"name": "ViT-L MLP block fwd+bwd, 12608 tokens, 90% sparse, 64x64, magnitude mask, layer by layer, "
                         "graph", "dense_ms": 1.0, "sparse_ms": 0.7}],
        "vit": [{"name": "ViT-L/16 inference, batch 64, MLPs 90% block-sparse (64), GELU fused into fc1, graph",
                 "dense_ms": 18.0, "sparse_ms": 12.0}]}}
    for row in bench_block.record_rows(report, "python scripts/bench_block.py", None):
        assert (row["model"], row["figure"], row["variant"]) in recorded, row["figure"]
