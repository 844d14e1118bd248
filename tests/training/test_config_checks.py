"""Every mistake in the config is caught before anything is built: one line naming the key, the value and the fix,
as an error train.py turns into exit code 2 (test_cli.py runs that path), and the files of an earlier run in the
same run directory stay as they were."""
import hashlib
import logging
import shutil

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from sparsetrain.training.app import train, validate_config
from sparsetrain.training.config_errors import describe
from sparsetrain.training.errors import USER_ERRORS
from tests.helpers import ROOT, TINY, compose_cfg


def snapshot(run_dir) -> dict:
    return {path.relative_to(run_dir): (path.stat().st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
            for path in run_dir.rglob("*") if path.is_file()}


@pytest.fixture(scope="module")
def earlier_run(tmp_path_factory):
    """A finished run whose directory every bad command below is pointed at."""
    run_dir = tmp_path_factory.mktemp("earlier")
    train(compose_cfg(["recipe=fmnist_dense", *TINY], run_dir))
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    return run_dir, snapshot(run_dir)


def refused(overrides, earlier_run) -> str:
    """The one line a bad config stops with; the earlier run's files must be untouched."""
    run_dir, before = earlier_run
    with pytest.raises(USER_ERRORS) as error:
        train(compose_cfg(overrides, run_dir))
    message = str(error.value)
    assert "\n" not in message, message
    assert snapshot(run_dir) == before
    return message


@pytest.mark.parametrize("overrides, expected", [
    # a wrong type
    (["optim.lr=abc"], "optim.lr=abc must be a number > 0, e.g. optim.lr=1e-3"),
    (["seed=abc"], "seed=abc must be an integer, e.g. seed=0"),
    (["trainer.max_steps=abc"], "trainer.max_steps=abc must be an integer, e.g. trainer.max_steps=-1"),
    (["force_resume=maybe"], "force_resume=maybe must be true or false"),
    (["nonfinite=maybe"], "nonfinite=maybe must be one of skip, stop"),
    (["trainer.precision=fp8"], "trainer.precision=fp8 must be one of 64, 32, 16, transformer-engine, "
                                "transformer-engine-float16, 16-true, 16-mixed, bf16-true, bf16-mixed, 32-true, "
                                "64-true, bf16, null"),
    (["sparsity=dress_multi", "prune_schedule=constant", "sparsity.subnet_levels=0.5"],
     "sparsity.subnet_levels=0.5 must be null or a list of numbers"),
    # a value out of range
    (["trainer.max_steps=-5"], "trainer.max_steps=-5 must be >= -1, e.g. trainer.max_steps=1000 (-1: no limit)"),
    (["data.batch_size=0"], "data.batch_size=0 must be >= 1, e.g. data.batch_size=64"),
    (["sparsity=block", "sparsity.sparsity=1.5"],
     "sparsity.sparsity=1.5 must be in [0, 1): it is the fraction of blocks pruned"),
    (["label_smoothing=1"], "label_smoothing=1 must be in [0, 1), e.g. label_smoothing=0.1"),
    (["sched.min_lr_ratio=2"], "sched.min_lr_ratio=2 must be in [0, 1], e.g. sched.min_lr_ratio=0.01"),
    # a key no schema knows, added with +
    (["+foo=1"], "foo=1 is not a setting of the config; remove it (the settings: allow_cpu, callbacks, compile, "
                 "cuda_graph, data, force_resume, label_smoothing, logger, model, nonfinite, objective, optim, paths, "
                 "prune_schedule, recipe_name, requires_gpu, resume, run_name, sched, seed, sparsity, trainer)"),
    (["+optim.lrr=1"], "optim.lrr=1 is not a setting of torch.optim.AdamW; did you mean optim.lr?"),
    (["+trainer.max_stepz=3"], "trainer.max_stepz=3 is not a setting of lightning.pytorch.Trainer; did you mean "
                               "trainer.max_steps?"),
    (["+sched.warmup=3"], "sched.warmup=3 is not a setting of sched; did you mean sched.warmup_steps?"),
    (["+callbacks.checkpoint.every=1"], "callbacks.checkpoint.every=1 is not a setting of callbacks.checkpoint; "
                                        "remove it (the settings: every_n_epochs, every_n_train_steps, mode, monitor, "
                                        "save_top_k)"),
    (["+data.trainsize=8"], "data.trainsize=8 is not a setting of sparsetrain.training.data.SyntheticDataModule; "
                            "did you mean data.train_size?"),
    (["+logger.csv.save_dirr=x"], "logger.csv.save_dirr=x is not a setting of sparsetrain.training.resumable."
                                  "ResumableCSVLogger; did you mean logger.csv.save_dir?"),
    (["sparsity=block", "+sparsity.srste_lambda=0.1"], "sparsity.srste_lambda=0.1 is not a setting of sparsity "
     "(pattern block); remove it (the settings: backend, block_size, criterion, exclude, grad_mode, include, "
     "masked_decay, pattern, score_init, score_lr_scale, sparsity, subnet_levels, subnet_weights)"),
    (["logger=wandb", "logger.wandb.offline=maybe"], "logger.wandb.offline=maybe must be null or true or false"),
    (["+model.embed_dimm=64"], "model.embed_dimm=64 is not an argument of vit_tiny_patch16_224 "
                               "(VisionTransformer.__init__); remove it or check its spelling"),
    (["optim._target_=torch.optim.AdamWW"], "optim._target_=torch.optim.AdamWW cannot be imported (module "
                                            "'torch.optim' has no attribute 'AdamWW'); check its spelling"),
    (["model.num_classes=${data.classes}"], "model.num_classes: Interpolation key 'data.classes' not found"),
])
def test_a_wrong_key_type_or_range_is_one_line_with_the_fix(overrides, expected, earlier_run):
    assert refused(["recipe=fmnist_dense", *TINY, *overrides], earlier_run) == expected


def test_any_trainer_argument_is_a_valid_key(tmp_path):
    validate_config(compose_cfg(["recipe=fmnist_dense", *TINY, "+trainer.accumulate_grad_batches=2",
                                 "+trainer.detect_anomaly=true"], tmp_path))


@pytest.mark.parametrize("overrides, expected", [
    (["recipe=fmnist_vit_block", "sparsity.block_size=48"], "sparsity=block would train a dense model: block_size 48 "
     "divides none of the 128/512-wide weights; use 16, 32 or 64"),
    (["recipe=fmnist_vit_24", "sparsity.include=[head.*]"], "sparsity=semi24 would train a dense model: "
     "sparsity.include=['head.*'] with sparsity.exclude=[] selects none of the model's 25 linear/1x1-conv layers (the "
     "first and last stay dense), such as blocks.0.attn.qkv, blocks.0.attn.proj, blocks.0.mlp.fc1; widen "
     "sparsity.include"),
])
def test_a_sparse_recipe_that_would_train_dense_refuses_to_start(overrides, expected, earlier_run):
    assert refused([*overrides, *TINY], earlier_run) == expected


def test_some_dense_layers_are_one_warning(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="sparsetrain")
    # 2:4 on the width-66 ViT with row-wise masks: fc2 (66x264) is served, the layers 66 wide at the input are not
    validate_config(compose_cfg(["recipe=fmnist_vit_24", *TINY, "model.depth=2", "model.embed_dim=66",
                                 "model.num_heads=3", "sparsity.transposable=false"], tmp_path))
    assert [r.message for r in caplog.records] == [
        "6 of the 8 selected layers stay dense, blocks.0.attn.qkv 198x66 among them (in_features 66 is not a multiple "
        "of 4 (2:4 groups run along the input dim)); the layer table lists each"]


def test_a_gpu_recipe_on_the_cpu_stops_unless_asked(earlier_run, tmp_path):
    assert refused(["recipe=vit_l_24", *TINY], earlier_run) == (
        "recipe vit_l_24 is meant for a GPU (trainer.accelerator=cpu): add debug=smoke for a short CPU run of it, or "
        "allow_cpu=true to train it on the CPU anyway")
    validate_config(compose_cfg(["recipe=vit_l_24", *TINY, "allow_cpu=true"], tmp_path))
    validate_config(compose_cfg(["recipe=vit_l_24", "data=synthetic", "debug=smoke"], tmp_path))


def composition_error(overrides, config_dir=ROOT / "conf") -> str:
    GlobalHydra.instance().clear()
    with pytest.raises(Exception) as error, initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        compose("train", overrides=overrides)
    message = describe(error.value)
    assert "\n" not in message, message
    return message


@pytest.mark.parametrize("overrides, expected", [
    (["recipe=vit_l24"], "recipe=vit_l24: no such recipe option; did you mean recipe=vit_l_24? (the options: "),
    (["recipe=fmnist_dense", "data=imagenet"], "data=imagenet: no such data option; did you mean data=imagefolder? "
                                               "(the options: fashion_mnist, imagefolder, synthetic)"),
    (["recipe=fmnist_dense", "optim.lrr=1"],
     "optim.lrr=1 is not a setting of torch.optim.AdamW; did you mean optim.lr?"),
    (["recipe=fmnist_dense", "optimizer=adamw"], "optimizer=adamw is not a setting of the config; did you mean optim?"),
    (["recipe=fmnist_dense", "trainer.accumulate_grad_batches=2"], "trainer.accumulate_grad_batches=2: "
     "lightning.pytorch.Trainer takes accumulate_grad_batches, but the config files leave it at its default: set it "
     "with +trainer.accumulate_grad_batches=2"),
    (["recipe=fmnist_dense", "optim.lr=[1"], "optim.lr=[1: no viable alternative at input '[1' (the override syntax: "),
    ([], "You must specify 'recipe', e.g, recipe=<OPTION> (the options: fmnist_dense, "),
])
def test_a_mistake_hydra_finds_while_composing_is_one_line(overrides, expected):
    assert composition_error(overrides).startswith(expected)


def test_a_yaml_syntax_error_names_file_line_and_column(tmp_path):
    shutil.copytree(ROOT / "conf", tmp_path / "conf")  # conf/recipe links to recipes/; the copy holds the files
    broken = tmp_path / "conf" / "recipe" / "broken.yaml"
    broken.write_text("# @package _global_\nmodel:\n  name: vit\n   depth: 2\n")
    assert composition_error(["recipe=broken"], tmp_path / "conf") == (
        f"{broken} line 4, column 9: YAML syntax error, mapping values are not allowed here; fix the file")
