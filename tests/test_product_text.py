"""The repository speaks of the product only: no development diary in any tracked file, and no dates outside
measured records (a date belongs to a record row, where the tables are generated from)."""
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HISTORY = re.compile(r"\bsessions? \d+|\bissue ?#\d+|\bissues? \d+\b|\bwas [\d.]+x?, now\b|\bhonestly\b", re.I)
DATE = re.compile(r"\b20\d\d-[01]\d-[0-3]\d\b")
# Code, configs and tests carry no dates; tests may make up record rows, whose dates are far from any real one.
UNDATED = ("sparsetrain/", "scripts/", "conf/", "recipes/", "train.py", "pyproject.toml", ".ci/")


def tracked_text_files() -> list[Path]:
    try:
        names = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    files = []
    for name in names.splitlines():
        path = ROOT / name
        if path.is_file() and not path.is_symlink() and path.suffix not in (".png", ".ckpt", ".pt", ".safetensors"):
            files.append(path)
    return files


def test_no_tracked_file_narrates_how_it_was_built():
    found = []
    for path in tracked_text_files():
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if HISTORY.search(line):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:100]}")
    assert not found, "development history in tracked files:\n" + "\n".join(found)


def test_code_and_configs_carry_no_dates():
    found = []
    for path in tracked_text_files():
        name = path.relative_to(ROOT).as_posix()
        if not name.startswith(UNDATED):
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if DATE.search(line):
                found.append(f"{name}:{number}: {line.strip()[:100]}")
    assert not found, "dates outside the records:\n" + "\n".join(found)
