import json
import sys

import pytest

from sparsetrain.training.app import train
from tests.helpers import ROOT, compose_cfg

ATTENTION = ("attn.qkv", "attn.proj")


@pytest.mark.parametrize("recipe", ["vit_b_24", "vit_h_24", "vit_b_block"])
def test_sparse_layers_option_replaces_the_recipes_layers(recipe, tmp_path):
    assert list(compose_cfg([f"recipe={recipe}"], tmp_path).sparsity.include) == ["blocks.*.mlp.fc1", "blocks.*.mlp.fc2"]
    chosen = compose_cfg([f"recipe={recipe}", "sparse_layers=vit_mlp_attention"], tmp_path)
    assert list(chosen.sparsity.include) == ["blocks.*.mlp.fc1", "blocks.*.mlp.fc2", "blocks.*.attn.qkv",
                                             "blocks.*.attn.proj"]


def test_vit_recipe_with_attention_projections_trains_them_2_4(tmp_path):
    """`python train.py recipe=vit_l_24 sparse_layers=vit_mlp_attention data=synthetic debug=smoke`: every block's
    qkv and proj are 2:4 beside fc1 and fc2 (masked dense on the CPU), and hold the zeros they claim."""
    cfg = compose_cfg(["recipe=vit_l_24", "sparse_layers=vit_mlp_attention", "data=synthetic", "debug=smoke",
                       "++model.depth=2"], tmp_path)
    assert train(cfg)["global_step"] == 3
    sparse = [row for row in json.loads((tmp_path / "layers.json").read_text()) if row["pattern"] == "semi24"]
    names = {row["name"] for row in sparse}
    assert names == {f"blocks.{b}.{layer}" for b in range(2) for layer in ("mlp.fc1", "mlp.fc2", *ATTENTION)}
    assert all(row["measured_sparsity"] >= 0.49 for row in sparse), sparse


def test_bench_vit_variants_are_the_sparse_layers_options():
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench_vit

    assert bench_vit.sparse_layers(bench_vit.VARIANTS["all24"])[-2:] == [f"blocks.*.{layer}" for layer in ATTENTION]
    assert bench_vit.sparse_layers(bench_vit.VARIANTS["mlp24"]) == ["blocks.*.mlp.fc1", "blocks.*.mlp.fc2"]
