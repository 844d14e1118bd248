import sys

import pytest

from tests.helpers import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import bench_vit  # noqa: E402


def test_phase_rates_take_each_phases_median_step_after_its_warm_up(tmp_path):
    # 100 steps of 32 images: 0.5 s while warming up, 0.2 s in the ramp, 1 s at the frozen phase's capture, 0.1 s after
    def seconds(step):
        if step < bench_vit.WARMUP_STEPS:
            return 0.5
        if step < 30:
            return 0.2
        return 1.0 if step < 30 + bench_vit.FROZEN_SETTLE_STEPS else 0.1
    rows = "".join(f"{step},{seconds(step)},32\n" for step in range(bench_vit.BLOCK_STEPS))
    (tmp_path / "step_times.csv").write_text("step,seconds,images\n" + rows)
    rates = bench_vit.phase_rates(tmp_path, ramp_fraction=0.3)
    assert rates["trainpy ramp phase"] == pytest.approx(160)
    assert rates["trainpy frozen phase"] == pytest.approx(320)
    assert rates["trainpy whole run (30% ramp, 70% frozen)"] == pytest.approx(32 / (0.3 * 0.2 + 0.7 * 0.1))


def test_every_model_with_a_block_figure_has_its_block_recipe_which_ramps_over_a_fraction_of_the_run():
    for recipe, block_recipe in bench_vit.BLOCK_RECIPES.items():
        assert recipe in bench_vit.MODELS.values() and (ROOT / "recipes" / f"{block_recipe}.yaml").is_file()
        assert 0 < bench_vit.recipe_settings(block_recipe)["ramp_fraction"] < 1
