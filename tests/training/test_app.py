"""The spine: every recipe composes and trains a few steps, resume, summary.json, layer report, bad input; on a CUDA
GPU (`gpu`-marked), the block recipes train on the block-sparse kernels."""
import json

import pytest
import torch
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError

from sparsetrain.training.app import ConfigError, estimate_steps_per_epoch, train, validate_config
from sparsetrain.training.checkpoints import CheckpointError
from tests.helpers import RECIPES, TINY, compose_cfg

REQUIRED_RECIPES = {"vit_l_24", "vit_h_24", "vit_g_24", "vit_b_24", "resnet50_24", "vit_b_block", "vit_l_block",
                    "fmnist_vit_24", "fmnist_resnet_24", "fmnist_vit_block", "fmnist_dense"}


def test_required_recipes_ship():
    assert REQUIRED_RECIPES <= set(RECIPES)


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_composes_with_its_own_data(recipe, tmp_path):
    cfg = compose_cfg([f"recipe={recipe}"], tmp_path)
    assert cfg.recipe_name == recipe
    assert cfg.model.name and cfg.data._target_ and cfg.sparsity.pattern


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_runs_under_debug_smoke(recipe, tmp_path):
    """`python train.py recipe=RECIPE data=synthetic debug=smoke`, composed in-process so that the imports are paid
    once. ViTs keep 2 of their blocks (++model.depth=2): the same layer shapes, so the same layers go sparse on the
    same routes, but a cost that does not grow with depth, where a large ViT's 2:4 masks take long on a CPU.
    A gradual recipe starts its ramp at the target, since layers.json describes step 0."""
    smoke = [f"recipe={recipe}", "data=synthetic", "debug=smoke"]
    cfg = compose_cfg(smoke, tmp_path)
    if cfg.model.name.startswith("vit_"):
        smoke.append("++model.depth=2")
    if cfg.prune_schedule.kind == "gradual":
        smoke.append(f"prune_schedule.initial_level={cfg.sparsity.sparsity}")
    summary = train(compose_cfg(smoke, tmp_path))
    assert summary["global_step"] == 3
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["recipe"] == recipe and "val/acc" in saved["metrics"]
    assert not (tmp_path / "checkpoints").exists()  # debug=smoke writes none
    layers = json.loads((tmp_path / "layers.json").read_text())
    sparse = [row for row in layers if row["pattern"] != "dense"]
    if cfg.sparsity.pattern == "dense":
        assert not sparse
    else:
        # what the run says about its layers is true: sparse layers hold the zeros they claim
        assert sparse and all(row["measured_sparsity"] >= 0.49 for row in sparse), sparse


def test_resume_auto_continues_step_optimizer_and_schedule(tmp_path):
    base = ["recipe=fmnist_vit_24", *TINY, "callbacks.checkpoint.every_n_train_steps=1"]
    first = train(compose_cfg(base, tmp_path))
    assert first["global_step"] == 2
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 2 and ckpt["optimizer_states"] and ckpt["lr_schedulers"]
    masks = {k: v for k, v in ckpt["state_dict"].items() if k.endswith(".mask")}
    assert masks, "sparsity state (masks) must be in the checkpoint"
    resumed = train(compose_cfg([*base, "trainer.max_steps=4", "trainer.max_epochs=3", "resume=auto"], tmp_path))
    assert resumed["global_step"] == 4


def test_fresh_run_refuses_to_overwrite_checkpoints(tmp_path):
    base = ["recipe=fmnist_dense", *TINY]
    train(compose_cfg(base, tmp_path))
    with pytest.raises(CheckpointError, match="resume=auto"):
        train(compose_cfg(base, tmp_path))


def test_resume_auto_without_checkpoint_starts_fresh(tmp_path, capsys):
    summary = train(compose_cfg(["recipe=fmnist_dense", *TINY, "resume=auto"], tmp_path))
    assert summary["global_step"] == 2
    assert "starting fresh" in capsys.readouterr().out


def test_resume_from_other_recipe_is_refused_unless_forced(tmp_path):
    train(compose_cfg(["recipe=fmnist_vit_24", *TINY], tmp_path / "a"))
    ckpt = str(tmp_path / "a" / "checkpoints" / "last.ckpt")
    other = ["recipe=fmnist_dense", *TINY, f"resume={ckpt}", "trainer.max_steps=3"]
    with pytest.raises(CheckpointError, match="force_resume"):
        train(compose_cfg(other, tmp_path / "b"))


def test_checkpoint_from_a_different_model_is_refused(tmp_path):
    train(compose_cfg(["recipe=fmnist_dense", *TINY], tmp_path / "a"))
    ckpt = str(tmp_path / "a" / "checkpoints" / "last.ckpt")
    other = ["recipe=fmnist_dense", *TINY, f"resume={ckpt}", "model.embed_dim=64", "force_resume=true"]
    with pytest.raises(CheckpointError, match="different model"):
        train(compose_cfg(other, tmp_path / "b"))


@pytest.mark.parametrize("overrides, match", [
    (["optim.lr=-1"], "optim.lr"),
    (["data.batch_size=0"], "batch_size"),
    (["sparsity=block", "sparsity.sparsity=1.2"], r"\[0, 1\)"),
    (["sparsity=dress_multi", "prune_schedule=gradual"], "subnet_levels"),
    (["sparsity=dress_multi", "sparsity.subnet_levels=[0.9,1.2]"], r"subnet_levels has 1.2.*\[0, 1\)"),
    (["sparsity=dress", "prune_schedule=finetune"], "never train"),
    (["sparsity=dress_multi", "prune_schedule=iterative"], "never train"),
    (["sched.name=linear"], r"sched.name=linear must be one of cosine, constant"),
    (["trainer.precision=16-mixed", "trainer.gradient_clip_val=1.0"], r"optim.fused=false"),
    (["objective=val/loss"], r"objective=val/loss is not an accuracy this run logs .*\['val/acc'\]"),
    (["sparsity=dress_multi", "prune_schedule=constant", "objective=val/acc@0.3"],
     r"objective=val/acc@0.3 .*\['val/acc', 'val/acc@0.8', 'val/acc@0.5'\]"),
])
def test_impossible_overrides_stop_before_training(overrides, match, tmp_path):
    with pytest.raises(ConfigError, match=match):
        train(compose_cfg(["recipe=fmnist_dense", *TINY, *overrides], tmp_path))
    assert not (tmp_path / "checkpoints").exists()


def test_an_imagefolder_recipe_without_data_root_stops_before_training(tmp_path):
    with pytest.raises(ConfigError, match=r"data.root must be set on the command line .*data.root=/path/to/imagenet"):
        train(compose_cfg(["recipe=fmnist_dense", "data=imagefolder", "trainer.max_steps=1"], tmp_path))
    assert not (tmp_path / "checkpoints").exists()


def test_the_objective_may_be_any_subnet_accuracy_a_multi_subnet_run_logs(tmp_path):
    for objective in ("val/acc", "val/acc@0.8", "val/acc@0.5"):
        validate_config(compose_cfg(["recipe=fmnist_dense", *TINY, "sparsity=dress_multi", "prune_schedule=constant",
                                     f"objective={objective}"], tmp_path))


def test_unknown_recipe_lists_the_available_ones(tmp_path):
    with pytest.raises((MissingConfigException, ConfigCompositionException)) as info:
        compose_cfg(["recipe=vit_l_42"], tmp_path)
    assert "vit_l_24" in str(info.value)


def test_misspelt_key_is_rejected(tmp_path):
    with pytest.raises((ConfigCompositionException, ConfigAttributeError)) as info:
        compose_cfg(["recipe=fmnist_dense", "trainer.max_stepz=3"], tmp_path)
    assert "max_stepz" in str(info.value)


def test_misspelt_model_name_names_close_matches(tmp_path):
    with pytest.raises(ValueError, match="vit_tiny_patch16_224"):
        train(compose_cfg(["recipe=fmnist_dense", *TINY, "model.name=vit_tiny_patch16_2244"], tmp_path))


def test_missing_data_path_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.root"):
        train(compose_cfg(["recipe=fmnist_dense", "data.root=/nonexistent/fmnist", "trainer.max_steps=1"], tmp_path))


class _Batches:
    """A datamodule stand-in whose train loader has `n` batches."""

    def __init__(self, n):
        self.n = n

    def setup(self, stage):
        pass

    def train_dataloader(self):
        return range(self.n)


@pytest.mark.parametrize("trainer, steps", [
    ({}, 10),
    ({"devices": 2, "strategy": "ddp"}, 5),
    ({"devices": [0, 1, 2], "num_nodes": 2}, 2),
    ({"devices": "2", "accumulate_grad_batches": 2}, 3),
    ({"devices": 2, "limit_train_batches": 3}, 3),
    ({"devices": 1, "limit_train_batches": 0.5, "accumulate_grad_batches": 4}, 2),
])
def test_steps_per_epoch_count_what_each_rank_steps(trainer, steps):
    """Schedules that need the run's length (dense_final) must see DDP's split and gradient accumulation."""
    cfg = OmegaConf.create({"trainer": {"devices": 1, "accelerator": "cpu", **trainer}})
    assert estimate_steps_per_epoch(cfg, _Batches(10)) == steps


def test_bf16_mixed_clips_the_gradients_of_the_fused_optimizer(tmp_path, monkeypatch):
    """Lightning's mixed-precision plugin refuses to clip for a fused optimizer; bf16 has no scaler, so the
    module clips itself. The gradients each optimizer step used (still there after it) must have the clipped norm."""
    import lightning.pytorch as L

    from sparsetrain.training import app

    norms = []

    class GradNorms(L.Callback):
        def on_train_start(self, trainer, pl_module):
            optimizer = trainer.optimizers[0]
            assert optimizer.defaults["fused"]
            params = [p for group in optimizer.param_groups for p in group["params"]]
            optimizer.register_step_post_hook(lambda *_: norms.append(float(torch.stack(
                [p.grad.norm() for p in params if p.grad is not None]).norm())))

    build_callbacks = app.build_callbacks
    monkeypatch.setattr(app, "build_callbacks", lambda *a, **k: [*build_callbacks(*a, **k), GradNorms()])
    train(compose_cfg(["recipe=fmnist_dense", *TINY, "trainer.max_steps=3", "trainer.precision=bf16-mixed",
                       "trainer.gradient_clip_val=0.01"], tmp_path))
    assert len(norms) == 3 and max(norms) <= 0.01 * 1.001


# ---- on a CUDA GPU: block recipes end to end, their MLPs on the Triton block-sparse kernels ----

# TINY without its CPU pins: the recipe's own ${if_cuda:...} settings decide precision and backend.
ON_GPU = [o for o in TINY if not o.startswith(("trainer.accelerator=", "trainer.precision="))]


@pytest.mark.gpu
def test_the_block_recipe_trains_on_the_kernels(tmp_path):
    cfg = compose_cfg(["recipe=fmnist_vit_block", *ON_GPU, "data.img_size=28", "trainer.max_steps=3",
                       "prune_schedule.initial_level=0.8"], tmp_path)
    assert (cfg.trainer.precision, cfg.sparsity.backend) == ("bf16-mixed", "triton_bsr")
    summary = train(cfg)
    assert summary["global_step"] == 3
    rows = [row for row in json.loads((tmp_path / "layers.json").read_text()) if row["pattern"] == "block"]
    assert rows and all(row["backend"] == "triton_bsr" for row in rows), rows
    assert all(row["measured_sparsity"] >= 0.79 for row in rows), rows


@pytest.mark.gpu
def test_vit_b_block_picks_the_kernels_under_auto(tmp_path):
    """64x64 blocks at 90%: `auto` routes the MLPs to the kernels (the recipe trains bf16-mixed anyway)."""
    cfg = compose_cfg(["recipe=vit_b_block", *ON_GPU, "trainer.max_steps=2"], tmp_path)
    assert cfg.sparsity.backend == "auto"
    train(cfg)
    rows = [row for row in json.loads((tmp_path / "layers.json").read_text()) if row["pattern"] == "block"]
    assert len(rows) == 24 and all(row["backend"] == "triton_bsr" for row in rows), rows
