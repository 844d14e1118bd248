"""sparsetrain.export: tiny 2:4 and block runs trained by the app, exported in every format that applies; the
exported model computes what the training model computed, the files are as small as the sparsity says, and
bad inputs get one line that names the fix."""
import json
import os
import subprocess
import sys

import pytest
import torch
from hydra.utils import instantiate
from safetensors import safe_open

from sparsetrain.export import (ExportError, compress_semi24, decompress_semi24, export, load_exported, main,
                                network_state, read_checkpoint)
from sparsetrain.sparse.masks import mask_24
from sparsetrain.sparse.sparsify import sparse_modules
from sparsetrain.sparse.section import build_sparsity
from sparsetrain.training.app import train
from tests.helpers import ROOT, TINY, compose_cfg

SMALL = [*TINY, "model.depth=1"]
# The block recipe ramps its level over hundreds of steps; a 2-step run needs the target level at once.
RUNS = {"semi24": ["recipe=fmnist_vit_24"], "block": ["recipe=fmnist_vit_block", "prune_schedule=constant"]}
FORMATS_OF_RUN = {"semi24": ("dense", "semi24"), "block": ("dense", "bsr")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run dir and composed config of a 2-step run per pattern."""
    trained = {}
    for pattern, recipe in RUNS.items():
        run_dir = tmp_path_factory.mktemp(pattern)
        cfg = compose_cfg([*recipe, *SMALL], run_dir)
        train(cfg)
        trained[pattern] = (run_dir, cfg)
    return trained


@pytest.fixture(scope="module")
def exports(runs, tmp_path_factory):
    """(pattern, format) -> export dir."""
    out = tmp_path_factory.mktemp("exports")
    return {(pattern, fmt): export(run_dir / "checkpoints" / "last.ckpt", fmt, out / f"{pattern}-{fmt}")
            for pattern, (run_dir, _) in runs.items() for fmt in FORMATS_OF_RUN[pattern]}


def training_model(run_dir, cfg):
    """The run's model as the app builds it, holding the last checkpoint's weights, masks and scores."""
    model = instantiate(cfg.model)
    build_sparsity(model, cfg.sparsity)
    model.load_state_dict(network_state(read_checkpoint(run_dir / "checkpoints" / "last.ckpt")))
    return model.eval()


def sample(cfg):
    generator = torch.Generator().manual_seed(0)
    return torch.randn(3, cfg.data.channels, cfg.data.img_size, cfg.data.img_size, generator=generator)


def tensor_bytes(path, names):
    with safe_open(str(path), "pt") as f:
        return sum(f.get_tensor(name).nbytes for name in names)


def sparse_layer_names(export_dir):
    metadata = json.loads((export_dir / "metadata.json").read_text())
    return [layer["name"] for layer in metadata["layers"] if layer["pattern"] != "dense"]


@pytest.mark.parametrize("pattern,fmt", [(p, f) for p, formats in FORMATS_OF_RUN.items() for f in formats])
def test_exported_model_computes_what_the_training_model_did(runs, exports, pattern, fmt):
    run_dir, cfg = runs[pattern]
    x = sample(cfg)
    with torch.no_grad():
        expected = training_model(run_dir, cfg)(x)
        exported = load_exported(exports[pattern, fmt])
        assert not exported.training
        torch.testing.assert_close(exported(x), expected, atol=1e-6, rtol=1e-6)


EXPORT_WITHOUT_TRAINING = """
import sys
from sparsetrain.export import export, load_exported
out = export(sys.argv[1], "semi24", sys.argv[2])
load_exported(out, sparse_layers=True)
imported = sorted(m for m in sys.modules if m.startswith(("sparsetrain.training", "lightning", "hydra")))
assert not imported, imported
"""


def test_export_and_load_import_no_training_code(runs, tmp_path):
    run_dir, _ = runs["semi24"]
    done = subprocess.run([sys.executable, "-c", EXPORT_WITHOUT_TRAINING, str(run_dir / "checkpoints" / "last.ckpt"),
                           str(tmp_path / "export")], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert done.returncode == 0, done.stderr[-3000:]


def test_semi24_export_runs_on_the_sparse_layers_too(runs, exports):
    run_dir, cfg = runs["semi24"]
    x = sample(cfg)
    model = load_exported(exports["semi24", "semi24"], sparse_layers=True)
    reference = training_model(run_dir, cfg)
    for (name, layer), (_, trained) in zip(model.named_modules(), reference.named_modules()):
        if hasattr(layer, "mask"):
            assert torch.equal(layer.mask, trained.mask), name
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), atol=1e-6, rtol=1e-6)


def test_a_backend_the_run_forced_for_its_gpu_does_not_follow_the_export(runs, exports, tmp_path):
    """A GPU run of fmnist_vit_block forces triton_bsr; its export must still load on the CPU as sparse layers
    (the loader's device decides: `auto`), unless the caller forces a backend."""
    import shutil
    forced = tmp_path / "forced"
    shutil.copytree(exports["block", "bsr"], forced)
    metadata = json.loads((forced / "metadata.json").read_text())
    metadata["sparsity"]["backend"] = "triton_bsr"
    (forced / "metadata.json").write_text(json.dumps(metadata))
    run_dir, cfg = runs["block"]
    x = sample(cfg)
    model = load_exported(forced, sparse_layers=True)
    layers = [layer for _, layer in sparse_modules(model)]
    assert layers and all(layer.sparse_config.backend == "auto" and layer.backend_name == "emulated" for layer in layers)
    with torch.no_grad():
        torch.testing.assert_close(model(x), training_model(run_dir, cfg)(x), atol=1e-6, rtol=1e-6)
        with pytest.raises(ValueError, match="triton_bsr"):
            load_exported(forced, sparse_layers=True, backend="triton_bsr")(x)


def test_semi24_stores_about_half_the_bytes_of_the_sparse_layers(exports):
    dense, semi = exports["semi24", "dense"], exports["semi24", "semi24"]
    layers = sparse_layer_names(semi)
    dense_bytes = tensor_bytes(dense / "model.safetensors", [f"{n}.weight" for n in layers])
    parts = ("values", "positions")
    stored = tensor_bytes(semi / "model.safetensors", [f"{n}.weight.{p}" for n in layers for p in parts])
    assert 0.5 < stored / dense_bytes < 0.6
    saved = (dense / "model.safetensors").stat().st_size - (semi / "model.safetensors").stat().st_size
    assert saved == pytest.approx(dense_bytes - stored, abs=4096)  # the rest is the header's tensor list


def test_bsr_at_80_percent_stores_a_fifth_of_the_sparse_layers(exports):
    dense, bsr = exports["block", "dense"], exports["block", "bsr"]
    layers = sparse_layer_names(bsr)
    dense_bytes = tensor_bytes(dense / "model.safetensors", [f"{n}.weight" for n in layers])
    parts = ("values", "crow_indices", "col_indices")
    stored = tensor_bytes(bsr / "model.safetensors", [f"{n}.weight.{p}" for n in layers for p in parts])
    assert stored / dense_bytes < 0.22
    assert (bsr / "model.safetensors").stat().st_size < (dense / "model.safetensors").stat().st_size - 0.7 * dense_bytes


def test_dense_export_is_a_plain_state_dict_with_the_zeros(exports):
    path = exports["block", "dense"] / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        names = list(f.keys())
        fc1 = f.get_tensor("blocks.0.mlp.fc1.weight")
    assert not [n for n in names if n.endswith((".mask", ".block_scores", ".sparse_active", ".mask_step"))]
    assert (fc1 == 0).float().mean().item() == pytest.approx(1 - 51 / 256)


@pytest.mark.parametrize("pattern,fmt", [("semi24", "semi24"), ("block", "bsr")])
def test_metadata_says_what_was_exported(runs, exports, pattern, fmt):
    metadata = json.loads((exports[pattern, fmt] / "metadata.json").read_text())
    run_dir, cfg = runs[pattern]
    assert metadata["format"] == fmt and metadata["pattern"] == cfg.sparsity.pattern
    assert f"recipe={metadata['source_recipe']}" == RUNS[pattern][0]
    assert metadata["source_checkpoint"] == str((run_dir / "checkpoints" / "last.ckpt").resolve())
    assert metadata["torch_version"] == torch.__version__ and metadata["global_step"] == 2
    sparse = [layer for layer in metadata["layers"] if layer["pattern"] != "dense"]
    assert sparse and all(layer["storage"] == fmt for layer in sparse)
    if fmt == "bsr":
        assert metadata["block_size"] == 16
        assert all(layer["block_size"] == 16 and layer["sparsity"] == pytest.approx(1 - 51 / 256) for layer in sparse)
    else:
        assert all(layer["sparsity"] == pytest.approx(0.5) for layer in sparse)


def test_exported_files_get_the_permissions_of_any_new_file(runs, tmp_path):
    umask = os.umask(0o022)
    try:
        out = export(runs["semi24"][0] / "checkpoints" / "last.ckpt", "semi24", tmp_path / "out")
    finally:
        os.umask(umask)
    assert {path.name: oct(path.stat().st_mode & 0o777) for path in out.iterdir()} == {
        "model.safetensors": "0o644", "metadata.json": "0o644"}


def test_semi24_layout_round_trips_rows_not_a_multiple_of_8():
    weight = torch.randn(6, 12)
    mask = mask_24(weight.abs())
    weight = weight * mask
    weight[0, mask[0].nonzero()[0]] = 0.0  # a kept value that is zero keeps its position
    parts = compress_semi24(weight, mask, "layer")
    assert parts["values"].shape == (6, 6) and parts["positions"].shape == (6, 2)
    restored, restored_mask = decompress_semi24(parts["values"], parts["positions"], 12)
    assert torch.equal(restored, weight) and torch.equal(restored_mask, mask)


def test_activation_sparse_run_exports_dense_and_loads_with_its_activation_pruning(tmp_path):
    cfg = compose_cfg(["recipe=fmnist_vit_24", *SMALL, "sparsity=act24", "model.mlp_act=squared_relu"], tmp_path)
    train(cfg)
    out = export(tmp_path / "checkpoints" / "last.ckpt", "dense", tmp_path / "export")
    x = sample(cfg)
    with torch.no_grad():
        expected = training_model(tmp_path, cfg)(x)
        torch.testing.assert_close(load_exported(out)(x), expected, atol=1e-6, rtol=1e-6)
        assert not torch.allclose(load_exported(out, sparse_layers=False)(x), expected, atol=1e-4)


def test_missing_and_corrupt_checkpoints_name_the_fix(runs, tmp_path):
    with pytest.raises(ExportError, match="does not exist; pass a run's checkpoints/last.ckpt"):
        export(tmp_path / "nope.ckpt", "dense", tmp_path / "out")
    run_dir, _ = runs["semi24"]
    corrupt = run_dir / "checkpoints" / "corrupt.ckpt"
    corrupt.write_bytes((run_dir / "checkpoints" / "last.ckpt").read_bytes()[:5000])
    try:
        with pytest.raises(ExportError, match="corrupt or truncated"):
            export(corrupt, "dense", tmp_path / "out")
    finally:
        corrupt.unlink()
    with pytest.raises(ExportError, match="pass the --out directory"):
        load_exported(tmp_path)


def test_a_format_the_run_has_no_layers_for_is_refused(runs, tmp_path):
    with pytest.raises(ExportError, match="sparsity.pattern is semi24; use --format semi24 or --format dense"):
        export(runs["semi24"][0] / "checkpoints" / "last.ckpt", "bsr", tmp_path / "out")
    with pytest.raises(ExportError, match="pattern is block; use --format bsr or --format dense"):
        export(runs["block"][0] / "checkpoints" / "last.ckpt", "semi24", tmp_path / "out")


def test_a_run_that_ended_dense_exports_only_dense(tmp_path):
    train(compose_cfg(["recipe=fmnist_vit_24", *SMALL, "prune_schedule=dense_final"], tmp_path / "run"))
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    with pytest.raises(ExportError, match="ran dense at this checkpoint .* use --format dense"):
        export(ckpt, "semi24", tmp_path / "out")
    assert (export(ckpt, "dense", tmp_path / "out") / "model.safetensors").is_file()


def test_cli_exports_and_reports_errors_in_one_line(runs, tmp_path, capsys):
    ckpt = runs["semi24"][0] / "checkpoints" / "last.ckpt"
    moved_config = tmp_path / "elsewhere.yaml"
    moved_config.write_text((ckpt.parent.parent / "config.yaml").read_text())
    main([str(ckpt), "--format", "semi24", "--out", str(tmp_path / "out"), "--config", str(moved_config)])
    assert "exported" in capsys.readouterr().out and (tmp_path / "out" / "metadata.json").is_file()
    # the module entry point, as a user runs it: exit status 2 and one line naming the fix
    bad = subprocess.run([sys.executable, "-m", "sparsetrain.export", str(ckpt), "--format", "bsr", "--out",
                          str(tmp_path / "bad")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "use --format semi24 or --format dense" in bad.stderr


def test_a_multi_subnet_run_reports_and_exports_each_trained_level(tmp_path):
    """DRESS multi-subnet: validation reports every subnet (val/acc@LEVEL beside the main val/acc), and
    --level exports that subnet, whose model computes what the training model does at that level."""
    from sparsetrain.sparse.block import set_block_level
    levels = [0.8, 0.6, 0.4]
    cfg = compose_cfg(["recipe=fmnist_vit_block", "prune_schedule=constant", "sparsity=dress_multi",
                       f"sparsity.subnet_levels=[{','.join(map(str, levels))}]", *SMALL], tmp_path / "run")
    summary = train(cfg)
    assert {"val/acc", "val/acc@0.6", "val/acc@0.4"} <= set(summary["metrics"])
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    out = export(ckpt, "bsr", tmp_path / "at-0.6", level=0.6)
    metadata = json.loads((out / "metadata.json").read_text())
    assert metadata["sparsity"]["sparsity"] == 0.6
    blocks = [layer for layer in metadata["layers"] if layer["pattern"] == "block"]
    assert blocks and all(layer["sparsity"] == pytest.approx(0.6, abs=0.01) for layer in blocks)
    model = training_model(tmp_path / "run", cfg)
    set_block_level(model, 0.6)
    x = sample(cfg)
    with torch.no_grad():
        torch.testing.assert_close(load_exported(out)(x), model(x), atol=1e-6, rtol=1e-6)
    with pytest.raises(ExportError, match=r"no subnet at that level.*0\.8, 0\.6, 0\.4"):
        export(ckpt, "bsr", tmp_path / "at-0.3", level=0.3)


@pytest.mark.gpu
@pytest.mark.parametrize("pattern,fmt,backend", [("semi24", "semi24", "cusparselt"), ("block", "bsr", "triton_bsr")])
def test_gpu_export_loads_onto_the_gpu_kernels_and_matches_training(runs, exports, pattern, fmt, backend, monkeypatch):
    """An export made by export() loads on CUDA with its sparse layers on the GPU route (2:4: cuSPARSELt with the
    weight compressed at the first forward and reused after; bsr: the block-sparse kernels) and computes, in
    bf16, what the training model computes."""
    from sparsetrain.sparse import sparse_modules
    run_dir, cfg = runs[pattern]
    x = sample(cfg)
    loaded = load_exported(exports[pattern, fmt], device="cuda", backend=backend).bfloat16()
    layers = [layer for _, layer in sparse_modules(loaded)]
    with torch.no_grad():
        expected = training_model(run_dir, cfg)(x)
        got = loaded(x.cuda().bfloat16()).float().cpu()
        assert layers and all(layer.backend_name == backend for layer in layers)
        if pattern == "semi24":
            backend_object = layers[0]._backend(torch.device("cuda", torch.cuda.current_device()), torch.bfloat16)
            calls = []
            original = backend_object.prepare_weight
            monkeypatch.setattr(backend_object, "prepare_weight", lambda *a, **k: calls.append(1) or original(*a, **k))
            loaded(x.cuda().bfloat16())
            assert calls == [], "an eval forward compressed the weight again"
    assert float((got - expected).norm() / expected.norm()) < 2e-2
