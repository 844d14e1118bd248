"""Run every GPU test of the suite, one pytest process per file, and append the results to results/gpu-tests.jsonl.

    python scripts/gpu_tests.py [--logs gpu-test-logs] [--timeout 600] [--record results/gpu-tests.jsonl]

A file under tests/, in any folder, is a GPU test file when it marks tests with `pytest.mark.gpu`; each runs as
`python -m pytest -q -m gpu FILE` in its own process, so a CUDA error that poisons one process cannot fail the files
after it. Prints one line per file and keeps each file's whole output in the logs folder. Each file's passed / failed
/ skipped counts become a row of the record, with the date, commit, GPU and library versions (`--record ''` records
nothing).
"""
from __future__ import annotations

import argparse
import datetime
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COUNTS = re.compile(r"(\d+) (passed|failed|skipped|error|errors)\b")


def gpu_test_files(tests: Path = ROOT / "tests") -> list[Path]:
    """The test files under `tests`, in every folder, that mark tests with `pytest.mark.gpu`."""
    return sorted(p for p in tests.rglob("test_*.py") if "pytest.mark.gpu" in p.read_text())


def counts(summary: str) -> dict[str, int]:
    """passed / failed / skipped of pytest's last line ("3 passed, 1 failed, 2 deselected in 4.2s"); errors count as
    failures."""
    found = {"passed": 0, "failed": 0, "skipped": 0}
    for number, kind in COUNTS.findall(summary):
        found["failed" if kind.startswith("error") else kind] += int(number)
    return found


def environment() -> dict:
    import torch

    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip() or None
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    head = git("rev-parse", "--short", "HEAD")
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
            "commit": head and head + ("+dirty" if git("status", "--porcelain", "-uno") else ""),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "torch": torch.__version__,
            "cusparselt": torch.backends.cusparselt.version() if torch.cuda.is_available() else None,
            "triton": triton_version}


def run_file(path: Path, logs: Path, timeout: int) -> dict:
    """Run one file's GPU tests; its counts, the command, and the log's last line."""
    command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", str(path)]
    relative = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    # Named by its dotted path (tests.gpu.test_backends.log): files in two folders may share a name.
    log = logs / (".".join(part for part in relative.with_suffix("").parts if part != "/") + ".log")
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        output = done.stdout + done.stderr
    except subprocess.TimeoutExpired as expired:
        output = f"{expired.stdout or ''}\ntimed out after {timeout} s: 1 failed"
    log.write_text(output)
    last = output.strip().splitlines()[-1] if output.strip() else ""
    return {"command": f"python -m pytest -q -m gpu {relative}", "tests": str(relative), **counts(last), "last": last}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logs", type=Path, default=ROOT / "gpu-test-logs", help="folder for each file's output")
    parser.add_argument("--timeout", type=int, default=600, help="seconds a file may run")
    parser.add_argument("--record", default=str(ROOT / "results" / "gpu-tests.jsonl"),
                        help="JSON-lines record to append to ('' for none)")
    args = parser.parse_args(argv)
    env = environment()
    if args.record and env["device"] == "cpu":
        parser.error("no CUDA GPU here: every GPU test would skip; pass --record '' to run them anyway")
    args.logs.mkdir(parents=True, exist_ok=True)
    print(env, flush=True)
    failed = 0
    for path in gpu_test_files():
        result = run_file(path, args.logs, args.timeout)
        last = result.pop("last")
        print(f"{result['tests']}: {last}", flush=True)
        failed += result["failed"]
        if args.record:
            with open(args.record, "a") as record:
                record.write(json.dumps({**env, **result}) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
