"""Checkpoints and exports written by earlier versions still load: each committed fixture (tests/fixtures/checkpoints,
one tiny train.py run per pattern) resumes with `resume=PATH` and loads with `load_exported`, and the layers it gives
hold the masks and scores stored beside it and compute the outputs and gradients stored beside it."""
import json

import pytest
import safetensors.torch
import torch
from safetensors import safe_open

from sparsetrain.export import export, load_exported
from sparsetrain.sparse.sparsify import layer_table, sparse_modules
from sparsetrain.training import app
from tests.helpers import ROOT, compose_cfg

FIXTURES = ROOT / "tests" / "fixtures" / "checkpoints"
# The train.py overrides each fixture was written with (paths.root and run_name aside).
SMALL = ["data=synthetic", "data.channels=1", "data.img_size=28", "data.batch_size=4", "data.train_size=16",
         "data.val_size=8", "data.num_workers=0", "trainer.accelerator=cpu", "trainer.precision=32-true",
         "trainer.max_epochs=1", "trainer.max_steps=2", "trainer.limit_val_batches=1", "logger=csv",
         "trainer.enable_progress_bar=false", "sched.warmup_steps=0", "model.depth=1", "model.embed_dim=32",
         "model.num_heads=2"]
RUNS = {
    "semi24": ["recipe=fmnist_vit_24"],
    "act24": ["recipe=fmnist_vit_24", "sparsity=act24", "model.mlp_act=squared_relu"],
    "block": ["recipe=fmnist_vit_block", "prune_schedule=constant"],
}
EXPORT_FORMAT = {"semi24": "semi24", "act24": "dense", "block": "bsr"}


@pytest.fixture(autouse=True)
def single_thread():
    # The stored outputs were computed with one intra-op thread: the same reduction order.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def expected(pattern: str) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(FIXTURES / pattern / "expected.safetensors"))


def sample() -> torch.Tensor:
    return torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))


def resumed_model(pattern: str, run_dir, monkeypatch) -> torch.nn.Module:
    """The network of a run resumed from the fixture with `resume=PATH`, as Lightning restored it. The run is
    already at its last step, so it trains no further; it starts from another seed, so that everything the
    network holds can only come from the checkpoint."""
    restored = {}
    write_summary = app.write_summary

    def keep_module(cfg, run_dir, trainer, module, *rest):
        restored["model"] = module.model
        return write_summary(cfg, run_dir, trainer, module, *rest)

    monkeypatch.setattr(app, "write_summary", keep_module)
    checkpoint = FIXTURES / pattern / "checkpoints" / "last.ckpt"
    summary = app.train(compose_cfg([*RUNS[pattern], *SMALL, "seed=1", f"resume={checkpoint}"], run_dir))
    assert summary["global_step"] == 2
    return restored["model"]


def assert_sparsity_state(model: torch.nn.Module, stored: dict[str, torch.Tensor], scores: bool = True) -> None:
    """The sparse layers are the fixture's, with its masks and (scores=True) its learned block scores."""
    layers = sparse_modules(model)
    assert {f"{name}.mask" for name, _ in layers} == {key for key in stored if key.endswith(".mask")}
    for name, layer in layers:
        assert torch.equal(layer.mask, stored[f"{name}.mask"]), name
        assert hasattr(layer, "block_scores") == (f"{name}.block_scores" in stored), name
        if scores and hasattr(layer, "block_scores"):
            assert torch.equal(layer.block_scores.detach(), stored[f"{name}.block_scores"]), name


@pytest.mark.filterwarnings("ignore:The dirpath has changed")  # the fixture was written in another run directory
@pytest.mark.parametrize("pattern", list(RUNS))
def test_a_run_resumes_from_the_fixture_with_its_masks_scores_and_numerics(pattern, tmp_path, monkeypatch):
    stored = expected(pattern)
    model = resumed_model(pattern, tmp_path, monkeypatch).eval()
    assert_sparsity_state(model, stored)
    rows = [{**row, "shape": list(row["shape"])} for row in layer_table(model)]
    assert rows == json.loads((FIXTURES / pattern / "expected_layers.json").read_text())
    x = sample()
    with torch.no_grad():
        torch.testing.assert_close(model(x), stored["eval_output"])

    # A training forward re-picks the masks as the run's next step would, and the gradients follow.
    model.train()
    y = model(x)
    torch.testing.assert_close(y.detach(), stored["train_output"])
    y.square().sum().backward()
    for name, layer in sparse_modules(model):
        assert torch.equal(layer.mask, stored[f"{name}.mask_after_train_forward"]), name
        torch.testing.assert_close(layer.weight.grad, stored[f"{name}.weight_grad"])
        if hasattr(layer, "block_scores"):
            torch.testing.assert_close(layer.block_scores.grad, stored[f"{name}.block_scores_grad"])


@pytest.mark.parametrize("pattern", list(RUNS))
def test_the_fixture_export_loads_with_its_masks_and_outputs(pattern):
    stored = expected(pattern)
    with torch.no_grad():
        torch.testing.assert_close(load_exported(FIXTURES / pattern / "export")(sample()), stored["eval_output"])
        sparse = load_exported(FIXTURES / pattern / "export", sparse_layers=True)
        torch.testing.assert_close(sparse(sample()), stored["eval_output"])
    # An export keeps no scores: the exported mask is the one the layers run.
    assert_sparsity_state(sparse, stored, scores=False)
    assert all(bool(layer.mask_frozen) for _, layer in sparse_modules(sparse) if layer.pattern != "act24")


@pytest.mark.parametrize("pattern", list(RUNS))
def test_exporting_the_fixture_checkpoint_again_writes_the_fixture_export(pattern, tmp_path):
    fixture = FIXTURES / pattern
    out = export(fixture / "checkpoints" / "last.ckpt", EXPORT_FORMAT[pattern], tmp_path / "export")
    with safe_open(str(fixture / "export" / "model.safetensors"), "pt") as old, \
            safe_open(str(out / "model.safetensors"), "pt") as new:
        assert sorted(new.keys()) == sorted(old.keys())
        for key in old.keys():
            assert torch.equal(new.get_tensor(key), old.get_tensor(key)), key
    provenance = ("source_checkpoint", "source_config", "torch_version")
    old_metadata, new_metadata = (json.loads((d / "metadata.json").read_text()) for d in (fixture / "export", out))
    assert {k: v for k, v in new_metadata.items() if k not in provenance} == \
        {k: v for k, v in old_metadata.items() if k not in provenance}
