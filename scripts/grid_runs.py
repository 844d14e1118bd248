"""Run many short train.py jobs side by side and read back their summary.json: the engine of
scripts/accuracy_table.py and scripts/block_recipe_study.py.

A run whose summary.json exists is not trained again, so a grid can be filled over several sessions
(or device calls). Each run directory gets the exact command in command.txt.
"""
from __future__ import annotations

import json
import shlex
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Run:
    root: Path  # paths.root of the run
    recipe: str
    name: str  # run_name; the run directory is root/recipe/name
    overrides: tuple[str, ...]

    @property
    def dir(self) -> Path:
        return self.root / self.recipe / self.name

    @property
    def args(self) -> list[str]:
        # resume=auto: a run cut off (a device call's time limit) continues from its last checkpoint.
        return [f"recipe={self.recipe}", *self.overrides, f"paths.root={self.root}", f"run_name={self.name}",
                "resume=auto", "trainer.enable_progress_bar=false"]

    def command(self) -> str:
        # Quoted for a shell: globs such as sparsity.include=[blocks.*.mlp.*] must reach Hydra as typed.
        return "python train.py " + " ".join(shlex.quote(a) for a in self.args).replace(f"{ROOT}/", "")

    def summary(self) -> dict | None:
        path = self.dir / "summary.json"
        return json.loads(path.read_text()) if path.is_file() else None


def train(run: Run) -> str | None:
    """Train one run unless it has a summary already; returns an error line, or None when it worked."""
    if run.summary() is not None:
        return None
    log = run.root / "logs" / f"{run.recipe}-{run.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    print(run.command(), flush=True)
    with open(log, "w") as f:
        done = subprocess.run([sys.executable, str(ROOT / "train.py"), *run.args], stdout=f,
                              stderr=subprocess.STDOUT, cwd=ROOT)
    if done.returncode != 0:
        return f"{run.name}: exit {done.returncode}, see {log}"
    (run.dir / "command.txt").write_text(run.command() + "\n")
    return None


def train_all(runs: list[Run], jobs: int) -> list[str]:
    """Train the runs, `jobs` at a time (one GPU serves several small runs at once); the errors."""
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return [error for error in pool.map(train, runs) if error]


def accuracies(runs: list[Run]) -> list[float]:
    """val/acc of the runs that finished."""
    return [s["metrics"]["val/acc"] for s in (r.summary() for r in runs) if s is not None]


def mean_and_spread(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), max(values) - min(values)


def write_report(out: Path, text: str, errors: list[str]) -> int:
    """Write and print a results table, then the failed runs; the exit status (1 if any run failed)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    for error in errors:
        print("FAILED", error, file=sys.stderr)
    return 1 if errors else 0
