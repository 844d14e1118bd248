"""Append the accuracy of finished experiment runs to results/accuracy.jsonl, one row per run.

    python train.py -m experiment=fmnist_vit_dense,fmnist_vit_semi24 seed=0,1
    python scripts/record_accuracy.py runs/fmnist_dense/vit-dense-s0 runs/fmnist_dense/vit-semi24-s*
    python scripts/tables.py

A run is a folder that train.py finished (summary.json beside config.yaml) under an experiment of conf/experiment/,
whose run name `<model>-<method>-s<seed>` names it. A row holds the run's top-1, steps, device and torch from
summary.json, the experiment's label, the command that trains the run again, and the commit checked out here (run
this from the checkout that trained the runs). Runs already in the record are skipped, so it is safe to run again.
"""
from __future__ import annotations

import argparse
import datetime
import json
import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "conf" / "experiment"
RECORD = ROOT / "results" / "accuracy.jsonl"
RUN_NAME = re.compile(r"(?P<model>[a-z0-9]+)-(?P<method>[a-z0-9_.]+)-s(?P<seed>\d+)$")


def experiment_label(name: str) -> str:
    """The label an experiment file gives its method: its first comment line after `# @package _global_`."""
    path = EXPERIMENTS / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"no experiment {name} in {EXPERIMENTS}")
    return path.read_text().splitlines()[1].removeprefix("# ")


def commit() -> str | None:
    def git(*args):
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else None
    head = git("rev-parse", "--short", "HEAD")
    return head and head + ("+dirty" if git("status", "--porcelain", "-uno") else "")


def row_of(run_dir: Path, head: str | None) -> dict:
    """The record row of one finished run; ValueError naming the fix for a folder that is not one."""
    summary_path, config_path = run_dir / "summary.json", run_dir / "config.yaml"
    if not summary_path.is_file() or not config_path.is_file():
        raise ValueError(f"{run_dir} has no summary.json and config.yaml: not a finished train.py run")
    summary, config = json.loads(summary_path.read_text()), yaml.safe_load(config_path.read_text())
    match = RUN_NAME.match(config["run_name"])
    if match is None:
        raise ValueError(f"{run_dir}: run name {config['run_name']!r} is not an experiment's <model>-<method>-s<seed>; "
                         "train it with experiment=NAME")
    model, method, seed = match["model"], match["method"], int(match["seed"])
    experiment = f"fmnist_{model}_{method}"
    finished = datetime.datetime.fromtimestamp(summary_path.stat().st_mtime, datetime.timezone.utc)
    return {"commit": head, "date": finished.strftime("%Y-%m-%d"), "device": summary["device"],
            "torch": summary["torch"], "command": f"python train.py experiment={experiment} seed={seed}",
            "experiment": experiment, "model": model, "method": method, "label": experiment_label(experiment),
            "seed": seed, "seeds": 1, "split": "heldout" if config["data"].get("val_fraction") else "test",
            "metric": "val/acc", "value": round(summary["metrics"]["val/acc"], 4), "spread": None,
            "steps": summary["global_step"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (runs/<recipe>/<run_name>)")
    parser.add_argument("--record", type=Path, default=RECORD)
    args = parser.parse_args(argv)
    known = set()
    if args.record.exists():
        known = {(r["command"], r["device"], r["commit"], r["value"])
                 for r in map(json.loads, args.record.read_text().splitlines())}
    head = commit()
    try:
        rows = [row_of(run_dir, head) for run_dir in args.runs]
    except ValueError as error:
        parser.error(str(error))
    new = [r for r in rows if (r["command"], r["device"], r["commit"], r["value"]) not in known]
    args.record.parent.mkdir(parents=True, exist_ok=True)
    with open(args.record, "a") as record:
        for row in new:
            record.write(json.dumps(row) + "\n")
    print(f"{len(new)} rows appended to {args.record} ({len(rows) - len(new)} already there)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
