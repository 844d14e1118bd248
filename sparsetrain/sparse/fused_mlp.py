"""Block-sparse MLPs whose fc1 -> GELU -> fc2 trains as one autograd node on the kernels.

`fuse_block_mlps_(model)` swaps each eligible timm `Mlp` for a `BlockSparseMlp` holding the same layers (same
parameters, same state-dict keys). Where both linears run on the block-sparse kernels and a gradient is taken,
its forward calls `block_linear.block_sparse_mlp`, whose backward applies GELU's derivative in fc2's input-grad
kernel: one pass over the (tokens, 4 x width) activations less per step. Anywhere else (CPU, masked-dense
route, dense phases, eval) it runs the layers one by one, exactly as the Mlp did.
"""
from __future__ import annotations

import torch
from torch import nn

from sparsetrain.sparse.block_linear import block_sparse_mlp
from sparsetrain.sparse.layers import BlockLayer, compute_dtype


def _is_identity(module: nn.Module) -> bool:
    return isinstance(module, nn.Identity) or (isinstance(module, nn.Dropout) and module.p == 0)


def _fusable(mlp: nn.Module) -> bool:
    """timm's Mlp itself (its variants, e.g. GluMlp, gate or split fc1's output): block-sparse fc1 and fc2, exact
    GELU between them, no dropout and no norm."""
    from timm.layers import Mlp

    if type(mlp) is not Mlp:
        return False
    block_layers = all(isinstance(fc, BlockLayer) for fc in (mlp.fc1, mlp.fc2))
    exact_gelu = type(mlp.act) is nn.GELU and mlp.act.approximate == "none"
    extras = (mlp.drop1, mlp.norm, mlp.drop2)
    return block_layers and exact_gelu and not mlp.fc1.fuse_gelu and all(map(_is_identity, extras))


class BlockSparseMlp(nn.Module):
    """fc1 -> exact GELU -> fc2 of block-sparse layers; one fused autograd node where both run on the kernels.

    Without a gradient (eval, export) the layers run one by one, so `fuse_mlp_gelu_` still applies; after
    `densify_` they are plain linears and it is a plain MLP.
    """

    def __init__(self, mlp: nn.Module):
        super().__init__()
        self.fc1, self.act, self.fc2 = mlp.fc1, mlp.act, mlp.fc2

    def _fused_dtype(self, x: torch.Tensor) -> torch.dtype | None:
        """The compute dtype when this forward runs as one node on the kernels, else None."""
        fc1, fc2 = self.fc1, self.fc2
        if not (torch.is_grad_enabled() and isinstance(fc1, BlockLayer) and isinstance(fc2, BlockLayer)):
            return None
        if fc1.grad_mode != fc2.grad_mode or fc1.fuse_gelu:
            return None
        dtype = compute_dtype(x.device.type, fc1.weight.dtype)
        serve = fc1.block_kernels_serve(x.device, dtype) and fc2.block_kernels_serve(x.device, dtype)
        return dtype if serve else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self._fused_dtype(x)
        if dtype is None:
            return self.fc2(self.act(self.fc1(x)))
        with torch.autocast(x.device.type, enabled=False):
            return block_sparse_mlp(x.to(dtype), self.fc1.block_kernel_operands(dtype),
                                    self.fc2.block_kernel_operands(dtype), self.fc1.grad_mode)


def fuse_block_mlps_(model: nn.Module) -> list[str]:
    """Replace every eligible MLP (see `_fusable`) by a BlockSparseMlp, in place; returns their names."""
    fused = []
    for name, module in list(model.named_modules()):
        if name and _fusable(module):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, BlockSparseMlp(module))
            fused.append(name)
    return fused
