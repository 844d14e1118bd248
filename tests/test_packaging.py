"""The wheel that `pip install .` builds: the package's code, the configs and recipes as real files, and a
`sparsetrain-train` command that trains from any folder."""
import json
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from tests.helpers import ROOT

TINY_RUN = ["recipe=fmnist_dense", "data=synthetic", "data.img_size=32", "data.batch_size=4", "data.train_size=16",
            "data.val_size=8", "trainer.accelerator=cpu", "trainer.max_steps=2", "trainer.limit_val_batches=1",
            "trainer.enable_progress_bar=false", "model.depth=1", "sched.warmup_steps=0"]


def pip(*args, cwd):
    command = [sys.executable, "-m", "pip", *args, "--no-deps", "--no-index", "--disable-pip-version-check"]
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.mark.slow
def test_wheel_ships_the_configs_and_its_command_trains_outside_the_repository(tmp_path):
    source = tmp_path / "source"  # a copy: building writes build/ and *.egg-info beside the sources
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    for name in ("sparsetrain", "conf", "recipes"):  # the links conf/recipe and sparsetrain/conf stay links
        shutil.copytree(ROOT / name, source / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    pip("wheel", "--no-build-isolation", "-w", str(tmp_path / "wheel"), str(source), cwd=tmp_path)
    wheel = next((tmp_path / "wheel").glob("sparsetrain-*.whl"))

    with zipfile.ZipFile(wheel) as archive:
        shipped = set(archive.namelist())
        entry_points = next(archive.read(n).decode() for n in shipped if n.endswith(".dist-info/entry_points.txt"))
    expected = {f"sparsetrain/conf/{p.relative_to(ROOT / 'conf').as_posix()}" for p in (ROOT / "conf").rglob("*.yaml")}
    expected |= {f"sparsetrain/conf/recipe/{p.name}" for p in (ROOT / "recipes").glob("*.yaml")}
    expected |= {p.relative_to(ROOT).as_posix() for p in (ROOT / "sparsetrain").rglob("*.py")
                 if "conf" not in p.relative_to(ROOT).parts}
    assert expected - shipped == set()
    assert "sparsetrain-train = sparsetrain.cli:main" in entry_points

    site = tmp_path / "site"
    pip("install", "--target", str(site), str(wheel), cwd=tmp_path)
    assert not (site / "sparsetrain" / "conf").is_symlink() and (site / "sparsetrain" / "conf" / "recipe").is_dir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = dict(os.environ, PYTHONPATH=str(site), PYTHONUNBUFFERED="1")
    env.pop("HYDRA_FULL_ERROR", None)
    found = subprocess.run([sys.executable, "-c", "import importlib.util; print(importlib.util.find_spec('sparsetrain')"
                            ".origin)"], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=60)
    assert found.stdout.strip() == str(site / "sparsetrain" / "__init__.py"), found
    done = subprocess.run([str(site / "bin" / "sparsetrain-train"), *TINY_RUN, "paths.root=runs"], cwd=elsewhere,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "run finished: fmnist_dense" in done.stdout
    summary = json.loads((elsewhere / "runs" / "fmnist_dense" / "default" / "summary.json").read_text())
    assert summary["global_step"] == 2
    assert (elsewhere / "runs" / "fmnist_dense" / "default" / "train.log").is_file()
