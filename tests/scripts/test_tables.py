"""scripts/tables.py: the committed tables are what the committed records give, and the generator computes means,
spreads, comparisons with dense and speed-ups right on a small made-up record."""
import sys

import pytest

from tests.helpers import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import tables  # noqa: E402


def test_every_committed_table_is_generated_from_the_committed_records():
    for path, text in tables.generated().items():
        assert path.read_text() == text, f"{path.relative_to(ROOT)} is stale: run python scripts/tables.py"


def accuracy_row(method, seed, value, device="cpu", commit="abc", seeds=1, spread=None):
    return {"commit": commit, "date": "2030-01-02", "device": device, "torch": "2.14", "command": f"train {method} {seed}",
            "experiment": f"fmnist_vit_{method}", "model": "vit", "method": method, "label": method.upper(),
            "seed": seed, "seeds": seeds, "split": "test", "metric": "val/acc", "value": value, "spread": spread,
            "steps": 10}


def test_runs_of_one_method_become_a_row_compared_with_dense_of_the_same_device_and_commit():
    rows = [accuracy_row("dense", 0, 0.80), accuracy_row("dense", 1, 0.82), accuracy_row("semi24", 1, 0.83),
            accuracy_row("semi24", 0, 0.79), accuracy_row("dense", 0, 0.50, device="gpu"),
            accuracy_row("semi24", None, 0.70, device="gpu", commit=None, seeds=3, spread=0.01)]
    groups = {(g["method"], g["device"]): g for g in tables.accuracy_groups(rows)}
    semi = groups[("semi24", "cpu")]
    assert (semi["n"], semi["seed_list"], semi["command"]) == (2, [0, 1], "train semi24 0")
    assert semi["mean"] == pytest.approx(0.81) and semi["spread"] == pytest.approx(0.04)
    assert semi["vs_dense"] == pytest.approx(0.0)
    assert groups[("semi24", "gpu")]["vs_dense"] is None  # an aggregate has no dense aggregate beside it
    text = tables.accuracy_md(rows)
    assert "| SEMI24 | cpu | abc | 2030-01-02 | 2 | 0.8100 | 0.0400 | +0.00 pt | 10 | fmnist_vit_semi24 |" in text
    assert "| SEMI24 | gpu |  | 2030-01-02 | 3 | 0.7000 | 0.0100 |  |" in text


def speed_row(variant, median, unit="ms", date="2030-01-02T10:00", figure="mlp"):
    return {"commit": "abc", "date": date, "device": "GPU", "torch": "2.11", "cusparselt": 800, "triton": "3.6",
            "python": "3.12", "command": "python scripts/bench_vit.py", "model": "vit_l_24", "figure": figure,
            "variant": variant, "unit": unit, "median": median, "min": median, "max": median, "repeats": 3}


def test_speed_shows_the_newest_measurement_with_its_speed_up_over_dense_of_the_same_run():
    rows = [speed_row("dense", 2.0, date="2029-01-01T00:00"), speed_row("mlp24", 9.0, date="2029-01-01T00:00"),
            speed_row("dense", 1.2), speed_row("mlp24", 1.0),
            speed_row("dense", 100.0, unit="images/s", figure="trainpy"),
            speed_row("mlp24", 110.0, unit="images/s", figure="trainpy")]
    lines = tables.speed_md(rows).splitlines()
    assert "| vit_l_24 | mlp | mlp24 | 1 | ms | 1 - 1 | 3 | 1.200x |" in lines
    assert "| vit_l_24 | trainpy | mlp24 | 110 | images/s | 110 - 110 | 3 | 1.100x |" in lines
    assert not any("| 9 |" in line for line in lines)  # superseded by the newer run


def test_a_marked_region_is_replaced_and_a_missing_one_is_an_error():
    text = "intro\n<!-- t -->\nold\n<!-- /t -->\nend\n"
    assert tables.fill_markers(text, "t", "new") == "intro\n<!-- t -->\nnew\n<!-- /t -->\nend\n"
    with pytest.raises(ValueError, match="<!-- u -->"):
        tables.fill_markers(text, "u", "new")
