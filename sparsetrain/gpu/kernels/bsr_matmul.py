"""Block-sparse x dense matmuls for a weight pruned in b x b blocks (Triton, tuned per shape on sm90).

The weight W (out, in) stays one dense tensor; a `BlockIndex` says which of its blocks are kept.
Each program computes a (BLOCK_M, b) tile of the output and loops over the kept blocks of one
block row (forward) or one block column (input grad), reading those blocks straight from W:

    forward      y  = x  @ W_s^T (+ bias, then optionally GELU)   x (rows, in),  y (rows, out)
    input grad   dx = dy @ W_s (optionally times GELU'(h))         dy (rows, out), dx (rows, in)
    weight grad  dW = dy^T @ x at the kept blocks only, zeros elsewhere (pruned blocks get no gradient)

The weight grad's programs each own one kept block (and a slice of the rows, when the kept blocks are too few
to fill the GPU): a sampled dense-dense product whose work shrinks with the kept fraction as the others' does.

The input grad's GELU' epilogue serves a block-sparse MLP fc1 -> GELU -> fc2: fc2's input grad, times
GELU' at fc1's pre-activation h, is dL/dh, so GELU's backward never runs as a pass of its own.

Pruned blocks are never read, so W_s = W * block_mask without ever writing W * block_mask.
The index is built from a bool block mask by torch ops alone (cumsum + scatter: no host sync, no
data-dependent shapes), so it can be rebuilt every step and inside a CUDA graph; the loop bound
of each program is a count the kernel loads from memory.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from sparsetrain.gpu.kernels import bsr_autotune

BLOCK_SIZES = (16, 32, 64)
HALF_DTYPES = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class BlockIndex:
    """Where the kept b x b blocks of an (out, in) weight are, per block row and per block column.

    row_blocks[r, :row_counts[r]] are the kept block columns of block row r in ascending order
    (the forward's loop); col_blocks[c, :col_counts[c]] the kept block rows of block column c
    (the input grad's loop). Entries past a count are the pruned blocks and are never read.
    density: the kept fraction it is tuned for (a host number; reading it from the mask would sync).
    """

    block_size: int
    row_counts: torch.Tensor  # (out/b,) int32
    row_blocks: torch.Tensor  # (out/b, in/b) int32
    col_counts: torch.Tensor  # (in/b,) int32
    col_blocks: torch.Tensor  # (in/b, out/b) int32
    density: float

    @property
    def weight_shape(self) -> tuple[int, int]:
        b = self.block_size
        return self.row_blocks.shape[0] * b, self.col_blocks.shape[0] * b


def _kept_first(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of a (rows, cols) 0/1 int32 tensor: the count of ones, and the column order that puts the
    ones first, ascending, then the zeros (a stable partition by cumsum + scatter)."""
    counts = keep.sum(1, dtype=torch.int32)
    kept_rank = keep.cumsum(1, dtype=torch.int32) - 1
    pruned_rank = counts[:, None] + (1 - keep).cumsum(1, dtype=torch.int32) - 1
    slot = torch.where(keep.bool(), kept_rank, pruned_rank).long()
    columns = torch.arange(keep.shape[1], dtype=torch.int32, device=keep.device).expand_as(keep)
    return counts, torch.empty_like(keep).scatter_(1, slot, columns)


def index_from_block_mask(block_mask: torch.Tensor, block_size: int, density: float | None = None) -> BlockIndex:
    """The `BlockIndex` of a bool (out/b, in/b) block mask with b = block_size.

    density None reads the kept fraction from the mask (one host sync: fine for static weights);
    training passes the fraction it pruned to, so a rebuild every step never waits for the GPU.
    """
    if block_mask.dim() != 2 or block_mask.dtype != torch.bool:
        raise ValueError(f"block_mask must be a 2-D bool tensor (out/b, in/b), got {block_mask.dtype} "
                         f"{tuple(block_mask.shape)}; pass layer.mask[::b, ::b] or a block mask of scores")
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"block_size={block_size}: the kernels serve blocks of {BLOCK_SIZES}; use the emulated "
                         "(masked dense) route for other sizes")
    keep = block_mask.to(torch.int32)
    row_counts, row_blocks = _kept_first(keep)
    col_counts, col_blocks = _kept_first(keep.t().contiguous())
    if density is None:
        density = float(keep.float().mean())
    return BlockIndex(block_size, row_counts, row_blocks, col_counts, col_blocks, float(density))


@triton.jit
def _erf_parts(x):
    """(erf(x), exp(-x^2)) with erf to 1.5e-7 absolute (Abramowitz & Stegun 7.1.26; far below bf16/fp16
    rounding): one approximate reciprocal, one exp and a few FMAs. libdevice's erff evaluates two polynomial
    branches per element, and in the epilogue of a (128, 64) tile per 4 warps that arithmetic is as long as
    the memory traffic. The exp is returned because GELU's derivative needs the same one."""
    a = tl.abs(x)
    t = tl.fdiv(1.0, 1.0 + 0.3275911 * a)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    gauss = tl.exp(-a * a)
    y = 1.0 - poly * gauss
    return tl.where(x < 0, -y, y), gauss


@triton.jit
def _gelu(h):
    """The erf GELU of nn.GELU's default: h * Phi(h)."""
    erf, _ = _erf_parts(h * 0.7071067811865476)
    return 0.5 * h * (1.0 + erf)


@triton.jit
def _gelu_grad(h):
    """d GELU(h) / dh = Phi(h) + h * phi(h); phi(h) = exp(-h^2 / 2) / sqrt(2 pi) is erf's own exp."""
    erf, gauss = _erf_parts(h * 0.7071067811865476)
    return 0.5 * (1.0 + erf) + h * 0.3989422804014327 * gauss


@triton.jit
def _bias_gelu(acc, bias_ptr, n, B: tl.constexpr, HAS_BIAS: tl.constexpr, GELU: tl.constexpr):
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n * B + tl.arange(0, B)).to(tl.float32)[None, :]
    if GELU:
        acc = _gelu(acc)
    return acc


@triton.jit
def _block_sparse_mm_kernel(a_ptr, w_ptr, bias_ptr, out_ptr, counts_ptr, blocks_ptr, h_ptr,
                            rows, stride_a, stride_w, stride_out, stride_blocks, out_blocks, stride_h,
                            TRANSPOSED: tl.constexpr, B: tl.constexpr, BLOCK_M: tl.constexpr,
                            HAS_BIAS: tl.constexpr, GELU: tl.constexpr, GELU_GRAD: tl.constexpr):
    """out[:, n*B:(n+1)*B] = sum over the kept blocks k of block row (or column) n of a[:, k*B:(k+1)*B] @ block.

    Forward (TRANSPOSED False): the block is W[n*B:, k*B:]^T. Input grad: W[k*B:, n*B:] as stored.
    """
    pid = tl.program_id(0)
    # Output block fastest: the programs running together share their rows of `a`, which stay in L2.
    pid_m = pid // out_blocks
    n = pid - pid_m * out_blocks
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_b = tl.arange(0, B)
    row_ok = offs_m < rows
    a_tile = a_ptr + offs_m.to(tl.int64)[:, None] * stride_a + offs_b[None, :]
    if TRANSPOSED:
        w_tile = w_ptr + offs_b[:, None].to(tl.int64) * stride_w + (n * B + offs_b)[None, :]
    else:
        w_tile = w_ptr + (n * B + offs_b)[:, None].to(tl.int64) * stride_w + offs_b[None, :]
    count = tl.load(counts_ptr + n)
    acc = tl.zeros((BLOCK_M, B), dtype=tl.float32)
    for i in range(0, count):
        k = tl.load(blocks_ptr + n * stride_blocks + i)
        a = tl.load(a_tile + k * B, mask=row_ok[:, None], other=0.0)
        if TRANSPOSED:
            w = tl.load(w_tile + (k * B).to(tl.int64) * stride_w)
        else:
            w = tl.trans(tl.load(w_tile + k * B))
        acc = tl.dot(a, w, acc)
    acc = _bias_gelu(acc, bias_ptr, n, B, HAS_BIAS, GELU)
    if GELU_GRAD:  # times GELU' at the pre-activation h (same shape as the output)
        h = tl.load(h_ptr + offs_m.to(tl.int64)[:, None] * stride_h + (n * B + offs_b)[None, :],
                    mask=row_ok[:, None], other=0.0)
        acc = acc * _gelu_grad(h.to(tl.float32))
    out = out_ptr + offs_m.to(tl.int64)[:, None] * stride_out + (n * B + offs_b)[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _block_sparse_mm_tma_kernel(a_desc, w_desc, out_desc, h_desc, bias_ptr, counts_ptr, blocks_ptr, stride_blocks,
                                out_blocks, TRANSPOSED: tl.constexpr, B: tl.constexpr, BLOCK_M: tl.constexpr,
                                STAGES: tl.constexpr, HAS_BIAS: tl.constexpr, GELU: tl.constexpr,
                                GELU_GRAD: tl.constexpr):
    """`_block_sparse_mm_kernel` with every tile moved by tensor descriptors (TMA on sm90): the copy engine
    computes the addresses and zero-fills rows past the end, so the warps only issue the MMAs. The tuner picks
    between the two per shape; `scripts/bench_block.py --only gemm` times both."""
    pid = tl.program_id(0)
    pid_m = pid // out_blocks
    n = pid - pid_m * out_blocks
    count = tl.load(counts_ptr + n)
    acc = tl.zeros((BLOCK_M, B), dtype=tl.float32)
    for i in tl.range(0, count, num_stages=STAGES):
        k = tl.load(blocks_ptr + n * stride_blocks + i)
        a = a_desc.load([pid_m * BLOCK_M, k * B])
        if TRANSPOSED:
            w = w_desc.load([k * B, n * B])
        else:
            w = w_desc.load([n * B, k * B]).T
        acc = tl.dot(a, w, acc)
    acc = _bias_gelu(acc, bias_ptr, n, B, HAS_BIAS, GELU)
    if GELU_GRAD:
        acc = acc * _gelu_grad(h_desc.load([pid_m * BLOCK_M, n * B]).to(tl.float32))
    out_desc.store([pid_m * BLOCK_M, n * B], acc.to(out_desc.dtype))


@triton.jit
def _block_weight_grad_kernel(gy_ptr, x_ptr, out_ptr, counts_ptr, blocks_ptr, rows, rows_per_split,
                              stride_gy, stride_x, stride_out, stride_blocks,
                              B: tl.constexpr, BLOCK_K: tl.constexpr, ATOMIC: tl.constexpr):
    """out[n*B:, k*B:] (a B x B block) = gy[:, n*B:(n+1)*B]^T @ x[:, k*B:(k+1)*B] for the i-th kept block k of block
    row n, over the rows of slice s (program (n, i, s)); with ATOMIC the slices add into an fp32 output."""
    n = tl.program_id(0)
    i = tl.program_id(1)
    count = tl.load(counts_ptr + n)
    if i < count:
        k = tl.load(blocks_ptr + n * stride_blocks + i)
        offs_b = tl.arange(0, B)
        start = tl.program_id(2) * rows_per_split
        stop = tl.minimum(start + rows_per_split, rows)
        acc = tl.zeros((B, B), dtype=tl.float32)
        for r in range(start, stop, BLOCK_K):
            offs_r = r + tl.arange(0, BLOCK_K)
            ok = offs_r < stop
            g = tl.load(gy_ptr + offs_r.to(tl.int64)[:, None] * stride_gy + (n * B + offs_b)[None, :],
                        mask=ok[:, None], other=0.0)
            a = tl.load(x_ptr + offs_r.to(tl.int64)[:, None] * stride_x + (k * B + offs_b)[None, :],
                        mask=ok[:, None], other=0.0)
            acc = tl.dot(tl.trans(g), a, acc)
        out = out_ptr + (n * B + offs_b).to(tl.int64)[:, None] * stride_out + (k * B + offs_b)[None, :]
        if ATOMIC:
            tl.atomic_add(out, acc)
        else:
            tl.store(out, acc.to(out_ptr.dtype.element_ty))


def _descriptor_ready(*tensors: torch.Tensor) -> bool:
    """Whether TMA can address these row-major operands: 16-byte aligned base and row stride."""
    return all(t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0 for t in tensors)


def _check_operands(a: torch.Tensor, weight: torch.Tensor, index: BlockIndex, a_features: int, what: str) -> None:
    if a.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"{what} takes a 2-D {tuple(a.shape)} operand and a 2-D weight; reshape to (rows, features)")
    if a.dtype not in HALF_DTYPES or weight.dtype != a.dtype:
        raise ValueError(f"{what} runs fp16/bf16 with one dtype, got {a.dtype} and weight {weight.dtype}; cast both "
                         "to the compute dtype (or use the emulated route for fp32)")
    if tuple(weight.shape) != index.weight_shape:
        raise ValueError(f"the weight is {tuple(weight.shape)} but the index was built for {index.weight_shape}; "
                         "rebuild it with index_from_block_mask(mask[::b, ::b], b)")
    if a.shape[1] != a_features:
        raise ValueError(f"{what}: the operand has {a.shape[1]} features, the weight needs {a_features}")
    if a.device != weight.device or index.row_counts.device != weight.device:
        raise ValueError(f"{what}: operand, weight and index must be on one device, got {a.device}, {weight.device}, "
                         f"{index.row_counts.device}")
    if a.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError(f"{what} needs row-major operands (last stride 1); call .contiguous() first")


def _launch(a, weight, index, bias, gelu, transposed, config, gelu_input=None):
    rows = a.shape[0]
    out_features = weight.shape[1] if transposed else weight.shape[0]
    counts, blocks = (index.col_counts, index.col_blocks) if transposed else (index.row_counts, index.row_blocks)
    out = torch.empty(rows, out_features, dtype=a.dtype, device=a.device)
    b = index.block_size
    out_blocks = out_features // b

    tensors = (a, weight, out) if gelu_input is None else (a, weight, out, gelu_input)
    descriptors_ok = _descriptor_ready(*tensors)

    def run(cfg: bsr_autotune.KernelConfig) -> None:
        grid = (triton.cdiv(rows, cfg.block_m) * out_blocks,)
        if cfg.tma:
            if not descriptors_ok:
                raise bsr_autotune.ConfigUnsupported("operands not 16-byte aligned for TMA")
            tile = [cfg.block_m, b]
            h = gelu_input if gelu_input is not None else out
            _block_sparse_mm_tma_kernel[grid](
                TensorDescriptor.from_tensor(a, tile), TensorDescriptor.from_tensor(weight, [b, b]),
                TensorDescriptor.from_tensor(out, tile), TensorDescriptor.from_tensor(h, tile),
                bias if bias is not None else a, counts, blocks, blocks.stride(0), out_blocks,
                TRANSPOSED=transposed, B=b, BLOCK_M=cfg.block_m, STAGES=cfg.num_stages, HAS_BIAS=bias is not None,
                GELU=gelu, GELU_GRAD=gelu_input is not None, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
            return
        _block_sparse_mm_kernel[grid](
            a, weight, bias if bias is not None else a, out, counts, blocks, a if gelu_input is None else gelu_input,
            rows, a.stride(0), weight.stride(0), out.stride(0), blocks.stride(0), out_blocks,
            0 if gelu_input is None else gelu_input.stride(0),
            TRANSPOSED=transposed, B=b, BLOCK_M=cfg.block_m, HAS_BIAS=bias is not None, GELU=gelu,
            GELU_GRAD=gelu_input is not None, num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    if rows == 0:
        return out
    if config is None and a.device.type != "cuda":  # Triton's CPU interpreter: nothing to tune
        config = bsr_autotune.DEFAULT
    if config is None:
        # "gelu" names the GELU epilogue of either direction (the input grad's is GELU's derivative).
        key = bsr_autotune.TuningKey.of("input_grad" if transposed else "forward", rows, weight.shape, b,
                                        index.density, a.dtype, bias is not None, gelu or gelu_input is not None,
                                        a.device)
        config = bsr_autotune.pick(key, run)
    if config.tma and not descriptors_ok:  # tuned on aligned operands; these are not
        config = bsr_autotune.DEFAULT
    run(config)
    return out


def block_sparse_linear(x: torch.Tensor, weight: torch.Tensor, index: BlockIndex, bias: torch.Tensor | None = None,
                        gelu: bool = False, config: bsr_autotune.KernelConfig | None = None) -> torch.Tensor:
    """x (rows, in) @ W_s^T + bias, then GELU if asked; W_s = weight with only the indexed blocks kept.

    config None: the tuned configuration for this shape (tuned now on first use; see bsr_autotune).
    """
    _check_operands(x, weight, index, weight.shape[1], "block_sparse_linear")
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.dtype != x.dtype or not bias.is_contiguous()):
        raise ValueError(f"bias must be a contiguous ({weight.shape[0]},) tensor of dtype {x.dtype}, got "
                         f"{bias.dtype} {tuple(bias.shape)}; cast it to the compute dtype")
    return _launch(x, weight, index, bias, gelu, transposed=False, config=config)


def block_sparse_input_grad(gy: torch.Tensor, weight: torch.Tensor, index: BlockIndex,
                            gelu_input: torch.Tensor | None = None,
                            config: bsr_autotune.KernelConfig | None = None) -> torch.Tensor:
    """gy (rows, out) @ W_s: the input gradient of `block_sparse_linear`; times GELU'(gelu_input)
    elementwise when gelu_input (rows, in), the pre-activation that a GELU turned into this input, is given."""
    _check_operands(gy, weight, index, weight.shape[0], "block_sparse_input_grad")
    if gelu_input is not None and (gelu_input.shape != (gy.shape[0], weight.shape[1]) or gelu_input.dtype != gy.dtype
                                   or gelu_input.stride(1) != 1 or gelu_input.device != gy.device):
        raise ValueError(f"gelu_input must be a row-major ({gy.shape[0]}, {weight.shape[1]}) {gy.dtype} tensor on "
                         f"{gy.device}, got {gelu_input.dtype} {tuple(gelu_input.shape)}")
    return _launch(gy, weight, index, None, False, transposed=True, config=config, gelu_input=gelu_input)


def block_sparse_weight_grad(gy: torch.Tensor, x: torch.Tensor, index: BlockIndex,
                             config: bsr_autotune.KernelConfig | None = None) -> torch.Tensor:
    """gy (rows, out)^T @ x (rows, in) at the kept blocks of `index`, zeros at the pruned ones: the weight gradient
    of `block_sparse_linear` when pruned blocks get none (grad_mode "masked"). (out, in) in gy's dtype.

    config None: the tuned configuration for this shape. Row slices add up with fp32 atomics, whose order varies
    from run to run; under torch.use_deterministic_algorithms(True) every block is reduced by one program.
    """
    out_features, in_features = index.weight_shape
    if gy.dim() != 2 or x.dim() != 2 or gy.shape[0] != x.shape[0]:
        raise ValueError(f"block_sparse_weight_grad takes gy (rows, out) and x (rows, in) with the same rows, got "
                         f"{tuple(gy.shape)} and {tuple(x.shape)}")
    if (gy.shape[1], x.shape[1]) != (out_features, in_features):
        raise ValueError(f"the index was built for a {out_features}x{in_features} weight, but gy has {gy.shape[1]} "
                         f"and x {x.shape[1]} features")
    if gy.dtype not in HALF_DTYPES or x.dtype != gy.dtype:
        raise ValueError(f"block_sparse_weight_grad runs fp16/bf16 with one dtype, got {gy.dtype} and {x.dtype}")
    if gy.stride(1) != 1 or x.stride(1) != 1:
        raise ValueError("block_sparse_weight_grad needs row-major operands (last stride 1); call .contiguous() first")
    b = index.block_size
    rows = gy.shape[0]
    counts, blocks = index.row_counts, index.row_blocks

    def run(cfg: bsr_autotune.KernelConfig) -> torch.Tensor:
        split = 1 if torch.are_deterministic_algorithms_enabled() else max(1, min(cfg.split_k, triton.cdiv(rows, cfg.block_m)))
        rows_per_split = triton.cdiv(triton.cdiv(rows, split), cfg.block_m) * cfg.block_m
        out = torch.zeros(out_features, in_features, dtype=torch.float32 if split > 1 else gy.dtype, device=gy.device)
        grid = (out_features // b, in_features // b, triton.cdiv(rows, rows_per_split))
        _block_weight_grad_kernel[grid](
            gy, x, out, counts, blocks, rows, rows_per_split, gy.stride(0), x.stride(0), out.stride(0),
            blocks.stride(0), B=b, BLOCK_K=cfg.block_m, ATOMIC=split > 1, num_warps=cfg.num_warps,
            num_stages=cfg.num_stages)
        return out.to(gy.dtype)

    if rows == 0:
        return torch.zeros(out_features, in_features, dtype=gy.dtype, device=gy.device)
    if config is None and gy.device.type != "cuda":  # Triton's CPU interpreter: nothing to tune
        config = bsr_autotune.WEIGHT_GRAD_DEFAULT
    if config is None:
        key = bsr_autotune.TuningKey.of("weight_grad", rows, index.weight_shape, b, index.density, gy.dtype, False,
                                        False, gy.device)
        config = bsr_autotune.pick(key, run, bsr_autotune.WEIGHT_GRAD_CANDIDATES, bsr_autotune.WEIGHT_GRAD_DEFAULT)
    return run(config)
