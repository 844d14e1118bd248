"""scripts/record_accuracy.py on fake run folders: a finished experiment run becomes one row of the record, once,
with its experiment's label and the command that trains it again; a folder that is not one is refused."""
import json
import sys

import pytest
import yaml

from tests.helpers import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import record_accuracy  # noqa: E402


def fake_run(root, run_name, acc, val_fraction=0.0):
    run_dir = root / run_name
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"run_name": run_name, "data": {"val_fraction": val_fraction}}))
    (run_dir / "summary.json").write_text(json.dumps({"metrics": {"val/acc": acc}, "global_step": 1404,
                                                      "device": "cpu", "torch": "2.14.1"}))
    return run_dir


def test_a_finished_run_becomes_one_row_once(tmp_path):
    record = tmp_path / "accuracy.jsonl"
    run = fake_run(tmp_path / "runs", "vit-semi24-s1", 0.87004)
    for _ in range(2):
        assert record_accuracy.main([str(run), "--record", str(record)]) == 0
    rows = [json.loads(line) for line in record.read_text().splitlines()]
    assert len(rows) == 1
    row = rows[0]
    assert row["command"] == "python train.py experiment=fmnist_vit_semi24 seed=1"
    assert (row["model"], row["method"], row["seed"], row["value"], row["split"]) == ("vit", "semi24", 1, 0.87, "test")
    assert row["label"] == "2:4 from scratch" and row["steps"] == 1404 and row["seeds"] == 1


def test_a_run_on_held_out_data_is_recorded_on_that_split(tmp_path):
    row = record_accuracy.row_of(fake_run(tmp_path, "resnet-dense-s0", 0.9, val_fraction=0.1), "abc1234")
    assert row["split"] == "heldout" and row["commit"] == "abc1234"


def test_a_run_outside_the_experiments_is_refused(tmp_path):
    with pytest.raises(ValueError, match="experiment=NAME"):
        record_accuracy.row_of(fake_run(tmp_path, "default", 0.9), None)
    with pytest.raises(ValueError, match="no experiment fmnist_vit_nothing"):
        record_accuracy.row_of(fake_run(tmp_path, "vit-nothing-s0", 0.9), None)
