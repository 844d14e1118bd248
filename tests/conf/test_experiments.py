"""conf/experiment/: every experiment that an accuracy record names composes to the config of the command that
made the record, each file carries the label its records show, and a sweep's jobs train where single runs do."""
import json
import re

import pytest
from omegaconf import OmegaConf

from tests.helpers import ROOT, TINY, compose_cfg, run_cli

EXPERIMENTS = ROOT / "conf" / "experiment"
RECORDS = [json.loads(line) for line in (ROOT / "results" / "accuracy.jsonl").read_text().splitlines()]
# One record per experiment whose command spells its overrides out (a record made by `experiment=NAME` names the
# file itself): one seed's command is enough, the seed is an override like any other.
FIRST = {}
for record in RECORDS:
    if record["experiment"] and "experiment=" not in record["command"]:
        FIRST.setdefault(record["experiment"], record)
# How the grid ran its jobs, which does not change what trains: loader processes, resuming, the progress bar.
RUN_SETTINGS = ("data.num_workers", "resume", "trainer.enable_progress_bar")


def label_of(path):
    lines = path.read_text().splitlines()
    assert lines[0] == "# @package _global_", path
    return lines[1].removeprefix("# ")


def resolved(overrides, tmp_path):
    cfg = OmegaConf.to_container(compose_cfg(overrides, tmp_path), resolve=True)
    for key in (*RUN_SETTINGS, "run_name", "paths"):
        parent, _, leaf = key.rpartition(".")
        (cfg[parent] if parent else cfg).pop(leaf, None)
    return cfg


def test_every_record_names_an_experiment_that_exists_with_its_label():
    for record in RECORDS:
        if record["experiment"]:
            assert label_of(EXPERIMENTS / f"{record['experiment']}.yaml") == record["label"], record["experiment"]


@pytest.mark.parametrize("name", sorted(FIRST))
def test_the_experiment_trains_what_its_records_ran(name, tmp_path):
    command = FIRST[name]["command"]
    overrides = command.removeprefix("python train.py ").replace("'", "").split()
    seed = re.search(r"\bseed=(\d+)", command).group(1)
    root = next(o for o in overrides if o.startswith("paths.root=")).split("=", 1)[1]
    recorded = resolved(overrides, tmp_path)
    experiment = resolved([f"experiment={name}", f"seed={seed}", f"paths.root={root}"], tmp_path)
    assert experiment == recorded


def test_a_job_of_an_experiment_sweep_trains_where_a_single_run_of_it_does(tmp_path):
    proc = run_cli(["-m", "experiment=fmnist_vit_dense", "seed=3", *TINY, f"paths.root={tmp_path / 'runs'}"],
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "runs" / "fmnist_dense" / "vit-dense-s3" / "summary.json").read_text())
    assert summary["global_step"] == 2
