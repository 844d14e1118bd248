"""Block recipes on a CUDA GPU, end to end: their MLPs train on the Triton block-sparse kernels."""
import json

import pytest

from sparsetrain.training.app import train
from tests.helpers import TINY, compose_cfg

pytestmark = pytest.mark.gpu

# TINY without its CPU pins: the recipe's own ${if_cuda:...} settings decide precision and backend.
ON_GPU = [o for o in TINY if not o.startswith(("trainer.accelerator=", "trainer.precision="))]


def test_the_block_recipe_trains_on_the_kernels(tmp_path):
    cfg = compose_cfg(["recipe=fmnist_vit_block", *ON_GPU, "data.img_size=28", "trainer.max_steps=3",
                       "prune_schedule.initial_level=0.8"], tmp_path)
    assert (cfg.trainer.precision, cfg.sparsity.backend) == ("bf16-mixed", "triton_bsr")
    summary = train(cfg)
    assert summary["global_step"] == 3
    rows = [row for row in json.loads((tmp_path / "layers.json").read_text()) if row["pattern"] == "block"]
    assert rows and all(row["backend"] == "triton_bsr" for row in rows), rows
    assert all(row["measured_sparsity"] >= 0.79 for row in rows), rows


def test_vit_b_block_picks_the_kernels_under_auto(tmp_path):
    """64x64 blocks at 90%: `auto` routes the MLPs to the kernels (the recipe trains bf16-mixed anyway)."""
    cfg = compose_cfg(["recipe=vit_b_block", *ON_GPU, "trainer.max_steps=2"], tmp_path)
    assert cfg.sparsity.backend == "auto"
    train(cfg)
    rows = [row for row in json.loads((tmp_path / "layers.json").read_text()) if row["pattern"] == "block"]
    assert len(rows) == 24 and all(row["backend"] == "triton_bsr" for row in rows), rows
