"""The sparse layers: drop-in nn.Linear / 1x1 nn.Conv2d that run a sparse GEMM, one class per pattern.

They keep the dense module's parameters (same names and shapes, so checkpoints move between
dense and sparse models) and carry the sparsity state in buffers, so it is in `state_dict`:

    mask           bool (out, in)  the mask of the last forward or update (all True for act24)
    sparse_active  bool scalar     False during dense phases: forward is the plain dense op
    mask_step      int64 scalar    step of the last mask update, as given by the caller
    mask_frozen    bool scalar     forward uses the stored mask and never recomputes it
    block_scores   Parameter       learned per-block scores (BlockConfig(criterion="scores"))

dtype rule: the sparse path computes in the autocast dtype when autocast is on for the input's
device, else in the weight's dtype. The fp32 master weight stays dense and trainable; the masks
are applied to its cast copy.

    SparseGemmLayer          base.py         state, schedule phases, checkpoints, layer-table rows
      Sparse24Layer          sparse24.py     2:4: level 0.5, the 2:4 backend of each device and dtype
        Semi24Layer          semi24.py       Semi24Config: 2:4 weights     -> Semi24Linear, Semi24Conv1x1
        Act24Layer           act24.py        Act24Config: 2:4 activations  -> Act24Linear, Act24Conv1x1
      BlockLayer             blocks.py       BlockConfig: pruned blocks    -> BlockLinear, BlockConv1x1
      SparseLinear, SparseConv1x1            linear_conv.py: the dense module each class above stands in for

`register_layer(ConfigType)` (registry.py) files a class under its config type; `sparsify_` and `from_dense` look
it up. Importing this package registers the three patterns.
"""

from sparsetrain.sparse.layers.act24 import Act24Conv1x1, Act24Layer, Act24Linear
from sparsetrain.sparse.layers.base import SparseGemmLayer, compute_dtype, gemm_shape
from sparsetrain.sparse.layers.blocks import BlockConv1x1, BlockLayer, BlockLinear
from sparsetrain.sparse.layers.linear_conv import SparseConv1x1, SparseLinear
from sparsetrain.sparse.layers.registry import layer_class, not_a_gemm_reason, register_layer, unsupported_reason
from sparsetrain.sparse.layers.semi24 import Semi24Conv1x1, Semi24Layer, Semi24Linear
from sparsetrain.sparse.layers.sparse24 import Sparse24Layer

__all__ = [
    "Act24Conv1x1", "Act24Layer", "Act24Linear", "BlockConv1x1", "BlockLayer", "BlockLinear", "Semi24Conv1x1",
    "Semi24Layer", "Semi24Linear", "Sparse24Layer", "SparseConv1x1", "SparseGemmLayer", "SparseLinear",
    "compute_dtype", "gemm_shape", "layer_class", "not_a_gemm_reason", "register_layer", "unsupported_reason",
]
