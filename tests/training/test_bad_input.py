"""Bad input the spine tests (test_app.py, test_cli.py) do not cover yet: each stops before training with one
clear error naming the fix, or leaves a layer dense with a logged reason and trains on."""
import json
import logging

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException

from sparsetrain.training.app import ConfigError, train
from sparsetrain.training.checkpoints import CheckpointError
from tests.helpers import TINY, compose_cfg

SMALL_VIT = ["model.depth=1", "model.embed_dim=64", "model.num_heads=2"]


@pytest.mark.parametrize("override, expected", [
    ("sparsity=semi42", ["Could not find 'sparsity/semi42'", "Available options in 'sparsity'", "semi24", "dress"]),
    ("optimizer=adamw", ["Could not override 'optimizer'"]),  # no such group (it is optim)
])
def test_unknown_config_group_or_option_names_what_exists(override, expected, tmp_path):
    with pytest.raises((MissingConfigException, ConfigCompositionException)) as error:
        compose_cfg(["recipe=fmnist_dense", override], tmp_path)
    assert all(text in str(error.value) for text in expected), str(error.value)


def layer_rows(run_dir) -> dict:
    return {row["name"]: row for row in json.loads((run_dir / "layers.json").read_text())}


def test_a_block_size_that_divides_no_layer_stops_before_anything_is_built(tmp_path):
    # 48 divides neither 64 nor 256: every MLP linear of the 64-wide ViT would stay dense
    with pytest.raises(ConfigError, match=r"^sparsity=block would train a dense model: block_size 48 divides none of "
                                          r"the 64/256-wide weights; use 16, 32 or 64$"):
        train(compose_cfg(["recipe=fmnist_vit_block", *TINY, *SMALL_VIT, "sparsity.block_size=48"], tmp_path))
    assert not any(tmp_path.iterdir())


def test_layer_shape_that_2to4_cannot_serve_stays_dense_with_the_reason(tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger="sparsetrain")
    # width 66 with row-wise masks: qkv (198x66), proj and fc1 have an input dim that is not a multiple of 4; fc2
    # (66x264) runs 2:4, so the run trains on with the others dense and says so in one warning
    summary = train(compose_cfg(["recipe=fmnist_vit_24", *TINY, "model.depth=1", "model.embed_dim=66",
                                 "model.num_heads=3", "sparsity.transposable=false"], tmp_path))
    assert summary["global_step"] == 2
    rows = layer_rows(tmp_path)
    assert rows["blocks.0.attn.qkv"]["pattern"] == "dense"
    assert "in_features 66 is not a multiple of 4" in rows["blocks.0.attn.qkv"]["reason"]
    assert rows["blocks.0.mlp.fc2"]["pattern"] == "semi24"
    assert "sparsify blocks.0.attn.qkv linear 198x66 -> dense" in caplog.text
    warnings = [r.message for r in caplog.records if r.levelno == logging.WARNING and "selected layers" in r.message]
    assert warnings == ["3 of the 4 selected layers stay dense, blocks.0.attn.qkv 198x66 among them (in_features 66 "
                        "is not a multiple of 4 (2:4 groups run along the input dim)); the layer table lists each"]


def test_2to4_on_layers_it_cannot_serve_stops_with_each_reason(tmp_path):
    # with transposable masks fc2 (66x264) cannot run 2:4 either: no layer is left
    cfg = ["recipe=fmnist_vit_24", *TINY, "model.depth=1", "model.embed_dim=66", "model.num_heads=3"]
    with pytest.raises(ConfigError, match=r"3 linear layers: in_features 66 is not a multiple of 4 .*; 1 linear layer: "
                                          r"out_features 66 .*set transposable=False"):
        train(compose_cfg(cfg, tmp_path))


@pytest.mark.parametrize("recipe, backend", [("fmnist_vit_24", "cusparselt"), ("fmnist_vit_block", "triton_bsr")])
@pytest.mark.parametrize("overrides, match", [
    (["trainer.precision=32-true"], r"needs fp16/bf16 .*trainer.precision=32-true.*bf16-mixed"),
    (["trainer.precision=bf16-mixed", "trainer.accelerator=cpu"], r"needs a CUDA GPU \(trainer.accelerator=cpu\)"),
])
def test_a_gpu_backend_where_it_cannot_run_stops_before_training(recipe, backend, overrides, match, tmp_path):
    cfg = [f"recipe={recipe}", *TINY, *SMALL_VIT, f"sparsity.backend={backend}", *overrides]
    with pytest.raises(ConfigError, match=match):
        train(compose_cfg(cfg, tmp_path))
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "config.yaml").exists()


def test_a_block_size_the_forced_kernels_do_not_run_stops_before_training(tmp_path):
    cfg = ["recipe=fmnist_vit_block", *TINY, *SMALL_VIT, "sparsity.backend=triton_bsr", "sparsity.block_size=8"]
    with pytest.raises(ConfigError, match=r"triton_bsr runs blocks of \[16, 32, 64\], not sparsity.block_size=8"):
        train(compose_cfg(cfg, tmp_path))


@pytest.fixture
def empty_class_folders(tmp_path):
    for split in ("train", "val"):
        (tmp_path / "imagenet" / split / "n01440764").mkdir(parents=True)
    return tmp_path / "imagenet"


@pytest.mark.parametrize("data, folder, match", [
    ("fashion_mnist", "empty", r"files not found in .*empty.*data\.root"),
    ("imagefolder", "empty", r"empty/train is not a folder.*data\.root"),
    ("imagefolder", "imagenet", r"n01440764 holds no images"),
])
def test_empty_data_folder_stops_before_training(data, folder, match, tmp_path, empty_class_folders):
    (tmp_path / "empty").mkdir()
    cfg = ["recipe=fmnist_dense", f"data={data}", f"data.root={tmp_path / folder}", "trainer.max_steps=1"]
    with pytest.raises(FileNotFoundError, match=match):
        train(compose_cfg(cfg, tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_resume_from_a_missing_checkpoint_names_the_path(tmp_path):
    with pytest.raises(CheckpointError, match=r"nowhere\.ckpt does not exist.*resume=PATH"):
        train(compose_cfg(["recipe=fmnist_dense", *TINY, f"resume={tmp_path / 'nowhere.ckpt'}"], tmp_path))


def test_resume_from_another_recipe_goes_ahead_when_forced(tmp_path):
    # Same network and sparsity (dense), different recipe: refused without force_resume (test_app), allowed with it.
    train(compose_cfg(["recipe=fmnist_dense", *TINY, *SMALL_VIT], tmp_path / "a"))
    ckpt = tmp_path / "a" / "checkpoints" / "last.ckpt"
    other = ["recipe=fmnist_vit_24", "sparsity=dense", *TINY, *SMALL_VIT, f"resume={ckpt}", "trainer.max_steps=3"]
    with pytest.raises(CheckpointError, match="checkpoint 'fmnist_dense' vs now 'fmnist_vit_24'.*force_resume=true"):
        train(compose_cfg(other, tmp_path / "b"))
    summary = train(compose_cfg([*other, "force_resume=true"], tmp_path / "b"))
    assert summary["global_step"] == 3
