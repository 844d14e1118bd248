"""Export a training checkpoint for inference, and load the export back.

    python -m sparsetrain.export RUN/checkpoints/last.ckpt --format dense|semi24|bsr --out DIR [--config PATH]
                                 [--level L]   (a multi-subnet DRESS run's subnet at level L)

The model is rebuilt from the run's resolved config (RUN/config.yaml, or --config), sparsified as the
run did, and loaded from the checkpoint; DIR then gets `model.safetensors` (the pruned network) and
`metadata.json` (format, per-layer pattern and sparsity, block size, source recipe and checkpoint, torch
version, and the model and sparsity configs `load_exported` rebuilds from).

Layouts in model.safetensors. A sparse layer NAME's weight is read as its GEMM operand W of shape
(m, k) (a 1x1 conv's (out, in, 1, 1) weight as (out, in)); every tensor not listed stays dense under
its state_dict name, and no mask or score buffers are stored.
    dense   every weight dense, pruned entries zero.
    semi24  per 2:4 layer:
              NAME.weight.values     (m, k/2), the weight's dtype: the 2 kept values of every group
                                     of 4 along k, in column order.
              NAME.weight.positions  (m, ceil(k/8)) uint8: each kept value's position inside its
                                     group (0-3), in the order of `values`, four 2-bit fields per
                                     byte, the first in the lowest bits; a row's tail is zero padding.
    bsr     per block-sparse layer with b x b blocks, the parts of torch.sparse_bsr_tensor(
              NAME.weight.crow_indices (m/b + 1,) int64, NAME.weight.col_indices (nnz,) int64,
              NAME.weight.values (nnz, b, b), size=(m, k)): kept blocks in row-major order.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import warnings
from pathlib import Path

import safetensors.torch
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from sparsetrain.models import COMPILE_WRAPPER_PREFIX, LIGHTNING_MODEL_PREFIX, create_model
from sparsetrain.sparse.block import block_mask_from_scores, expand_block_mask, set_block_level
from sparsetrain.sparse.block_linear import fuse_mlp_gelu_
from sparsetrain.sparse.section import build_sparsity
from sparsetrain.sparse.sparsify import layer_table, sparse_modules

FORMATS = ("dense", "semi24", "bsr")
# The run's sparsity pattern each compressed format stores; dense applies to every run.
PATTERN_OF_FORMAT = {"semi24": "semi24", "bsr": "block"}
FORMAT_OF_PATTERN = {pattern: fmt for fmt, pattern in PATTERN_OF_FORMAT.items()}
WEIGHTS_FILE = "model.safetensors"
METADATA_FILE = "metadata.json"


class ExportError(ValueError):
    """An input export cannot use; the message names the fix."""


# ----------------------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------------------


def export(checkpoint: str | Path, fmt: str, out: str | Path, config: str | Path | None = None,
           level: float | None = None) -> Path:
    """Write DIR/model.safetensors and DIR/metadata.json for `checkpoint` in format `fmt`; returns DIR.

    level: a multi-subnet DRESS run's subnet to export (one of its sparsity.subnet_levels); None: the main one.
    """
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r} is not known; use one of {', '.join(FORMATS)}")
    checkpoint = Path(checkpoint).expanduser().resolve()
    ckpt = read_checkpoint(checkpoint)
    config_path = Path(config).expanduser() if config else checkpoint.parent.parent / "config.yaml"
    cfg = read_run_config(config_path)
    model = rebuild_trained_model(cfg, network_state(ckpt), checkpoint, config_path)
    if level is not None:
        cfg = select_subnet(model, cfg, level)
    check_format_applies(fmt, cfg.sparsity.pattern, model)
    tensors, storage = compressed_tensors(model, fmt)
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(tensors, str(out / WEIGHTS_FILE))
    give_new_file_permissions(out / WEIGHTS_FILE)
    metadata = export_metadata(cfg, model, fmt, storage, checkpoint, config_path, ckpt.get("global_step"))
    (out / METADATA_FILE).write_text(json.dumps(metadata, indent=1))
    return out


def give_new_file_permissions(path: Path) -> None:
    """The mode any new file gets (0666 less the umask: 0644 under the usual 022). safetensors writes through a
    temporary file of its own, created 0600, which would leave the exported model unreadable to everyone else."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)


def read_checkpoint(path: Path) -> dict:
    if not path.is_file():
        raise ExportError(f"checkpoint {path} does not exist; pass a run's checkpoints/last.ckpt (or another .ckpt "
                          "that train.py wrote)")
    try:
        # A Lightning checkpoint pickles loop and callback state; this is the run's own file, the trust
        # Lightning itself gives it on resume.
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # truncated zip, pickle garbage, wrong file type: all mean "unusable"
        raise ExportError(f"checkpoint {path} is corrupt or truncated ({type(error).__name__}); export another "
                          "checkpoint of the run (checkpoints/*.ckpt)") from error
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise ExportError(f"{path} is not a training checkpoint (no state_dict); pass a .ckpt that train.py wrote")
    return ckpt


def read_run_config(path: Path) -> DictConfig:
    if not path.is_file():
        raise ExportError(f"no run config at {path} (train.py writes config.yaml into the run directory, next to "
                          "checkpoints/); pass --config PATH to the run's config.yaml")
    cfg = OmegaConf.load(path)
    if "model" not in cfg or "sparsity" not in cfg:
        raise ExportError(f"{path} has no model/sparsity sections; pass --config PATH to the run's config.yaml")
    return cfg


def network_state(ckpt: dict) -> dict[str, Tensor]:
    """The network's tensors: Lightning keeps them under `model.` (and torch.compile adds `_orig_mod.`)."""
    return {key.removeprefix(LIGHTNING_MODEL_PREFIX).replace(COMPILE_WRAPPER_PREFIX, ""): value
            for key, value in ckpt["state_dict"].items() if key.startswith(LIGHTNING_MODEL_PREFIX)}


def model_arguments(model_cfg) -> dict:
    """create_model's arguments from a `model:` section. pretrained_path is dropped: the checkpoint (or the
    export) holds every weight, and the file it named may be gone."""
    args = OmegaConf.to_container(model_cfg, resolve=True) if isinstance(model_cfg, DictConfig) else dict(model_cfg)
    args.pop("_target_", None)
    args["pretrained_path"] = None
    return args


def rebuild_trained_model(cfg: DictConfig, state: dict[str, Tensor], checkpoint: Path, config_path: Path) -> nn.Module:
    """The run's model, sparsified as the run did, holding the checkpoint's weights, masks and scores."""
    model = create_model(**model_arguments(cfg.model))
    build_sparsity(model, OmegaConf.to_container(cfg.sparsity, resolve=True))
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        first_line = str(error).splitlines()[0]
        raise ExportError(f"{checkpoint} does not fit the model built from {config_path} ({first_line}); pass "
                          "--config PATH to the config.yaml of the run that wrote the checkpoint") from error
    return model.eval()


def select_subnet(model: nn.Module, cfg: DictConfig, level: float) -> DictConfig:
    """Switch the model's block layers to one trained subnet `level`; the run config with it as the level."""
    trained = [float(v) for v in cfg.sparsity.get("subnet_levels") or []]
    if level not in trained:
        raise ExportError(f"--level {level}: this run trained no subnet at that level (its subnet levels: "
                          f"{trained or 'none, it is not a multi-subnet DRESS run'}); pass one of them, or omit "
                          "--level for the main one")
    set_block_level(model, level)
    cfg = copy.deepcopy(cfg)
    OmegaConf.resolve(cfg)  # subnet_levels may interpolate sparsity.sparsity, which changes next
    cfg.sparsity.sparsity = level
    return cfg


def check_format_applies(fmt: str, pattern: str, model: nn.Module) -> None:
    if fmt == "dense":
        return
    if pattern != PATTERN_OF_FORMAT[fmt]:
        fits = FORMAT_OF_PATTERN.get(pattern)
        hint = f"--format {fits} or --format dense" if fits else "--format dense"
        raise ExportError(f"--format {fmt} stores {PATTERN_OF_FORMAT[fmt]} layers, but this run's sparsity.pattern "
                          f"is {pattern}; use {hint}")
    ended_dense = [name for name, layer in sparse_modules(model) if not bool(layer.sparse_active)]
    if ended_dense:
        raise ExportError(f"{ended_dense[0]} (and {len(ended_dense) - 1} more) ran dense at this checkpoint (a dense "
                          f"phase of the prune schedule, e.g. dense_final); use --format dense, or export a checkpoint "
                          "from the sparse phase")


def plain_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The state_dict of the plain model whose outputs equal the sparse one's (act24 aside): effective (masked)
    weights, no sparsity buffers or block scores."""
    state = model.state_dict()
    for name, layer in sparse_modules(model):
        for key in layer.state_dict():
            if key not in ("weight", "bias"):
                del state[f"{name}.{key}"]
        state[f"{name}.weight"] = layer.effective_weight()
    # safetensors refuses views into shared storage; every tensor gets its own.
    return {key: value.detach().contiguous().clone() for key, value in state.items()}


def compressed_tensors(model: nn.Module, fmt: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    """model.safetensors' contents, and how each sparse layer's weight is stored (layer name -> storage)."""
    tensors = plain_state_dict(model)
    storage = {}
    for name, layer in sparse_modules(model):
        storage[name] = fmt if fmt != "dense" and layer.pattern == PATTERN_OF_FORMAT[fmt] else "dense"
        if storage[name] == "dense":
            continue
        weight = tensors.pop(f"{name}.weight").flatten(1)
        if fmt == "semi24":
            parts = compress_semi24(weight, layer.mask, name)
        else:
            parts = compress_bsr(weight, forward_mask(layer), layer.sparse_config.block_size, name)
        tensors.update({f"{name}.weight.{part}": value for part, value in parts.items()})
    return tensors, storage


def forward_mask(layer) -> Tensor:
    """The mask the layer's eval forward applies. A DRESS layer whose mask is not frozen picks it from its
    scores at every forward, so its stored mask (from the last training forward) is one optimizer step old."""
    config = layer.sparse_config
    if layer.pattern == "block" and config.criterion == "scores" and not bool(layer.mask_frozen):
        return expand_block_mask(block_mask_from_scores(layer.block_scores, layer.level), config.block_size)
    return layer.mask


def export_metadata(cfg: DictConfig, model: nn.Module, fmt: str, storage: dict[str, str], checkpoint: Path,
                    config_path: Path, global_step) -> dict:
    sparsity = OmegaConf.to_container(cfg.sparsity, resolve=True)
    layers = []
    for row in layer_table(model):
        layer = {key: row[key] for key in ("name", "shape", "pattern", "active")}
        layer["sparsity"] = row["measured_sparsity"]
        layer["storage"] = storage.get(row["name"], "dense")
        if row["pattern"] == "block":
            layer["block_size"] = sparsity["block_size"]
        layers.append(layer)
    return {
        "format": fmt,
        "pattern": sparsity["pattern"],
        "block_size": sparsity.get("block_size"),
        "source_recipe": cfg.get("recipe_name"),
        "source_checkpoint": str(checkpoint),
        "source_config": str(config_path.resolve()),
        "global_step": global_step,
        "torch_version": torch.__version__,
        "layers": layers,
        "model": model_arguments(cfg.model),
        "sparsity": sparsity,
    }


# ----------------------------------------------------------------------------------------------------------
# The two compressed layouts (see the module docstring)
# ----------------------------------------------------------------------------------------------------------


def compress_semi24(weight: Tensor, mask: Tensor, name: str) -> dict[str, Tensor]:
    m, k = weight.shape
    groups = mask.view(m, k // 4, 4)
    if not bool((groups.sum(-1) == 2).all()):
        raise ExportError(f"{name}'s mask is not 2:4 (some group of 4 keeps other than 2); use --format dense")
    positions = torch.arange(4, dtype=torch.uint8).expand(m, k // 4, 4)[groups].view(m, k // 2)
    values = weight.view(m, k // 4, 4)[groups].view(m, k // 2)
    return {"values": values.contiguous(), "positions": pack_2bit(positions)}


def decompress_semi24(values: Tensor, positions: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(weight (m, k) with zeros, bool mask (m, k)) from the semi24 layout."""
    m = values.shape[0]
    index = unpack_2bit(positions, k // 2).long().view(m, k // 4, 2)
    weight = torch.zeros(m, k // 4, 4, dtype=values.dtype).scatter_(-1, index, values.view(m, k // 4, 2))
    mask = torch.zeros(m, k // 4, 4, dtype=torch.bool).scatter_(-1, index, True)
    return weight.view(m, k), mask.view(m, k)


def pack_2bit(fields: Tensor) -> Tensor:
    """(m, n) values in 0..3 -> (m, ceil(n/4)) uint8, four per byte, the first in the lowest bits."""
    m, n = fields.shape
    padded = torch.zeros(m, -(-n // 4) * 4, dtype=torch.uint8)
    padded[:, :n] = fields
    quads = padded.view(m, -1, 4)
    return quads[..., 0] | (quads[..., 1] << 2) | (quads[..., 2] << 4) | (quads[..., 3] << 6)


def unpack_2bit(packed: Tensor, n: int) -> Tensor:
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8)
    return ((packed[..., None] >> shifts) & 3).view(packed.shape[0], -1)[:, :n]


def compress_bsr(weight: Tensor, mask: Tensor, block_size: int, name: str) -> dict[str, Tensor]:
    m, k = weight.shape
    b = block_size
    block_mask = mask[::b, ::b]
    if not torch.equal(mask, block_mask.repeat_interleave(b, 0).repeat_interleave(b, 1)):
        raise ExportError(f"{name}'s mask is not made of whole {b}x{b} blocks; use --format dense")
    crow_indices = torch.zeros(m // b + 1, dtype=torch.int64)
    crow_indices[1:] = block_mask.sum(1).cumsum(0)
    col_indices = block_mask.nonzero()[:, 1].contiguous()
    tiles = weight.reshape(m // b, b, k // b, b).transpose(1, 2)
    return {"crow_indices": crow_indices, "col_indices": col_indices, "values": tiles[block_mask].contiguous()}


def decompress_bsr(crow_indices: Tensor, col_indices: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    with warnings.catch_warnings():
        # torch's "BSR support is in beta" notice would print at every load; construction and to_dense are all we use.
        warnings.filterwarnings("ignore", message="Sparse BSR tensor support is in beta")
        # The invariant check rejects a damaged file here rather than as a memory error in to_dense.
        bsr = torch.sparse_bsr_tensor(crow_indices, col_indices, values, size=shape, check_invariants=True)
    return bsr.to_dense()


# ----------------------------------------------------------------------------------------------------------
# Loading an export
# ----------------------------------------------------------------------------------------------------------


def load_exported(directory: str | Path, device: str | torch.device = "cpu",
                  sparse_layers: bool | None = None, backend: str | None = None) -> nn.Module:
    """The exported model, in eval mode on `device`, its outputs those of the run's model at the checkpoint.

    Weights are rebuilt dense (pruned entries zero) from whatever layout was exported. Then:
    sparse_layers=None (default): activation-2:4 layers are swapped back in everywhere (their pruning is
        part of the function), and 2:4 and block layers on CUDA: `sparsify_` with the run's config and the
        `auto` backend, which runs cuSPARSELt (2:4) or the block-sparse Triton kernels where dtype (fp16/bf16:
        call .half() / .bfloat16() after loading) and shape allow and masked dense elsewhere; the masks
        come from the export and stay frozen, and each block MLP's GELU moves into its fc1 kernel
        (`fuse_mlp_gelu_`). On the CPU every weight-sparse layer is a plain layer holding masked dense weights.
    sparse_layers=True: swap the run's sparse layers in on any device (masked dense on the CPU).
    sparse_layers=False: plain layers only (an act24 model then loses its activation pruning).
    backend: the sparse layers' backend. Default `auto`, whatever the run trained with: a backend the run
        forced was chosen for its training device and dtype, not this one. Pass `cusparselt` or `triton_bsr`
        to force the GPU kernels on layers `auto` leaves masked dense (e.g. narrow ones), `emulated` for
        masked dense.
    An eval-mode 2:4 layer compresses its weight at the first forward and reuses it until the weight changes.
    """
    directory = Path(directory)
    if not (directory / METADATA_FILE).is_file() or not (directory / WEIGHTS_FILE).is_file():
        raise ExportError(f"{directory} holds no {METADATA_FILE} and {WEIGHTS_FILE}; pass the --out directory of "
                          "python -m sparsetrain.export")
    metadata = json.loads((directory / METADATA_FILE).read_text())
    tensors = safetensors.torch.load_file(str(directory / WEIGHTS_FILE))
    weights, masks = dense_weights(tensors, metadata["layers"])
    model = create_model(**metadata["model"])
    model.load_state_dict(weights)
    model.to(device)
    if sparse_layers is None:
        weight_sparse_runtime = torch.device(device).type == "cuda" and metadata["pattern"] in ("semi24", "block")
        sparse_layers = weight_sparse_runtime or metadata["pattern"] == "act24"
    if sparse_layers and metadata["pattern"] != "dense":
        metadata["sparsity"]["backend"] = backend or "auto"
        attach_sparse_layers(model, metadata, masks)
    return model.eval()


def dense_weights(tensors: dict[str, Tensor], layers: list[dict]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(plain state_dict, the masks the compressed layouts carry by layer name)."""
    weights, masks = dict(tensors), {}
    for layer in layers:
        name, shape = layer["name"], tuple(layer["shape"])
        gemm_shape = (shape[0], shape[1])
        if layer["storage"] == "semi24":
            weight, masks[name] = decompress_semi24(weights.pop(f"{name}.weight.values"),
                                                    weights.pop(f"{name}.weight.positions"), gemm_shape[1])
        elif layer["storage"] == "bsr":
            parts = [weights.pop(f"{name}.weight.{part}") for part in ("crow_indices", "col_indices", "values")]
            weight = decompress_bsr(*parts, gemm_shape)
            # From the kept blocks, not the nonzeros: a kept block may hold exact zeros.
            masks[name] = decompress_bsr(*parts[:2], torch.ones_like(parts[2]), gemm_shape).bool()
        else:
            continue
        weights[f"{name}.weight"] = weight.view(shape)
    return weights, masks


def attach_sparse_layers(model: nn.Module, metadata: dict, masks: dict[str, Tensor]) -> None:
    """Swap in the run's sparse layers; weight-sparse ones get the exported mask (where the layout has none:
    the weight's nonzeros), frozen, and each layer the active state it ended training with."""
    build_sparsity(model, metadata["sparsity"])
    active = {layer["name"]: layer["active"] for layer in metadata["layers"]}
    with torch.no_grad():
        for name, layer in sparse_modules(model):
            if layer.pattern != "act24":
                mask = masks.get(name)
                layer.mask.copy_(mask if mask is not None else layer.weight.flatten(1) != 0)
                layer.set_mask_frozen(True)
            layer.set_active(active[name])
    if metadata["pattern"] == "block":
        fuse_mlp_gelu_(model)


# ----------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="sparsetrain-export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a training checkpoint, e.g. runs/RECIPE/RUN/checkpoints/last.ckpt")
    parser.add_argument("--format", required=True, choices=FORMATS,
                        help="dense: masked dense weights; semi24: 2:4 values + 2-bit positions; "
                             "bsr: block-sparse rows")
    parser.add_argument("--out", required=True, help="directory for model.safetensors and metadata.json")
    parser.add_argument("--config", help="the run's config.yaml (default: CHECKPOINT/../../config.yaml)")
    parser.add_argument("--level", type=float, help="multi-subnet DRESS runs: the subnet (one of the run's "
                        "sparsity.subnet_levels) to export; default: the main one")
    args = parser.parse_args(argv)
    try:
        out = export(args.checkpoint, args.format, args.out, args.config, args.level)
    except ExportError as error:
        print(f"sparsetrain-export: error: {error}", file=sys.stderr)
        sys.exit(2)
    print(f"exported {args.checkpoint} as {args.format} to {out}")


if __name__ == "__main__":
    main()
