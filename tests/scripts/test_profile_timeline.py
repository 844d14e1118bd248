"""scripts/profile_timeline.py's analysis of a torch.profiler trace: busy/idle per step and who the host was in a gap.

The profiling itself needs a GPU; the analysis reads a chrome trace, here a hand-made one whose answer is known.
"""
import json
import sys

from tests.helpers import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import profile_timeline  # noqa: E402


def _trace(tmp_path):
    """Two steps; in each a 100 us kernel, then the host syncs in a logging frame and launches the next kernel
    400 us after the first ended (a 400 us gap per step), from a training-step frame."""
    events = []
    for step, t in enumerate((0, 1000)):
        events += [
            {"cat": "kernel", "name": "gemm", "ts": t, "dur": 100, "args": {"correlation": 10 * step + 1}},
            {"cat": "kernel", "name": "adam", "ts": t + 500, "dur": 500, "args": {"correlation": 10 * step + 2}},
            {"cat": "python_function", "name": "loggers.py(9): log_metrics", "ts": t + 50, "dur": 100},
            {"cat": "cuda_runtime", "name": "cudaStreamSynchronize", "ts": t + 60, "dur": 45},
            {"cat": "python_function", "name": "module.py(5): training_step", "ts": t + 200, "dur": 290},
            {"cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": t + 480, "dur": 5,
             "args": {"correlation": 10 * step + 2}},
        ]
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": events}))
    return path


def test_busy_idle_syncs_and_the_gap_owner_are_read_from_the_trace(tmp_path):
    report = profile_timeline.Report(tmp_path / "report.txt", "t")
    profile_timeline.analyze(_trace(tmp_path), steps=2, wall_s=0.002, say=report)
    text = (tmp_path / "report.txt").read_text()
    # GPU span 2000 us over 2 steps; busy 600 us per step; the gaps are 400 us each.
    assert "GPU span 1.00 ms/step, busy 0.60, idle 0.400 ms/step (40.0%)" in text
    assert "'200us-1ms': 0.4" in text
    assert "2     0.09 ms  cudaStreamSynchronize  <- log_metrics" in text.replace("loggers.py(9): ", "")
    assert "gap 0.400 ms" in text and "next: adam" in text
    assert "by: module.py(5): training_step" in text
    assert "host waited in cudaStreamSynchronize (0.04 ms) from: loggers.py(9): log_metrics" in text
    assert "host ran 0.29 ms: module.py(5): training_step" in text


def test_options_may_follow_the_mode_with_or_without_a_double_dash():
    for argv in (["out", "h", "trainpy", "--no-stack", "--start", "40", "--", "recipe=vit_l_24", "data=synthetic"],
                 ["out", "h", "trainpy", "--no-stack", "--start", "40", "recipe=vit_l_24", "data=synthetic"],
                 ["--no-stack", "--start", "40", "out", "h", "trainpy", "recipe=vit_l_24", "data=synthetic"]):
        args = profile_timeline.parse_args(argv)
        assert (args.no_stack, args.start, args.mode, args.rest) == (True, 40, "trainpy",
                                                                     ["recipe=vit_l_24", "data=synthetic"]), argv
