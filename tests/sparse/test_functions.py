import pytest
import torch
import torch.nn.functional as F

from sparsetrain.gpu.backends import EmulatedBackend
from sparsetrain.sparse.functions import activation_sparse_linear, weight_sparse_linear
from sparsetrain.sparse.masks import is_24, is_transposable_24, mask_24, mask_24_transposable

EMULATED = EmulatedBackend()
TIGHT = dict(rtol=1e-6, atol=1e-5)  # fp32: a few ulp of summation order

# (leading dims of x, in_features, out_features): small versions of ViT-B/L MLP and attention linears.
SHAPES = [
    ((7,), 16, 8),
    ((2, 5), 64, 96),
    ((2, 9), 96, 384),     # ViT-B fc1 / 8
    ((3, 4), 384, 96),     # ViT-B fc2 / 8
    ((2, 3), 96, 288),     # ViT-B qkv / 8
    ((1, 2, 3), 128, 512),  # ViT-L fc1 / 8, 4-D input
    ((5,), 512, 128),      # ViT-L fc2 / 8
]


def make_operands(lead, n_in, n_out, seed=0, dtype=torch.float32, bias=True):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, n_in, generator=gen).to(dtype).requires_grad_()
    w = torch.randn(n_out, n_in, generator=gen).to(dtype).requires_grad_()
    b = torch.randn(n_out, generator=gen).to(dtype).requires_grad_() if bias else None
    gy = torch.randn(*lead, n_out, generator=gen).to(dtype)
    return x, w, b, gy


def grads(output, gy, *tensors):
    return torch.autograd.grad(output, [t for t in tensors if t is not None], gy)


def masked_dense_reference(x, w, b, mask, gy):
    """Output and (dX, true dW of the masked layer, dB) of plain autograd on X @ (W * mask)^T + b."""
    x, w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    b = None if b is None else b.detach().clone().requires_grad_()
    y = F.linear(x, w * mask, b)
    return (y.detach(), *grads(y, gy, x, w, b))


class TestWeightSparseLinear:
    @pytest.mark.parametrize("lead, n_in, n_out", SHAPES)
    @pytest.mark.parametrize("transposable", [False, True])
    def test_masked_mode_equals_masked_dense(self, lead, n_in, n_out, transposable):
        x, w, b, gy = make_operands(lead, n_in, n_out)
        mask = (mask_24_transposable if transposable else mask_24)(w.detach().abs())
        y = weight_sparse_linear(x, w, b, mask, EMULATED, grad_mode="masked")
        got = (y.detach(), *grads(y, gy, x, w, b))
        for g, r in zip(got, masked_dense_reference(x, w, b, mask, gy)):
            torch.testing.assert_close(g, r, **TIGHT)

    @pytest.mark.parametrize("lead, n_in, n_out", SHAPES[:3])
    def test_ste_weight_grad_is_dense(self, lead, n_in, n_out):
        x, w, b, gy = make_operands(lead, n_in, n_out, seed=1)
        mask = mask_24(w.detach().abs())
        gx, gw, gb = grads(weight_sparse_linear(x, w, b, mask, EMULATED), gy, x, w, b)
        gy2d, x2d = gy.reshape(-1, n_out), x.detach().reshape(-1, n_in)
        torch.testing.assert_close(gw, gy2d.t() @ x2d, **TIGHT)
        torch.testing.assert_close(gx, (gy2d @ (w.detach() * mask)).reshape(x.shape), **TIGHT)
        torch.testing.assert_close(gb, gy2d.sum(0), **TIGHT)

    def test_grad_modes_follow_their_formulas_exactly(self):
        x, w, b, gy = make_operands((3, 4), 64, 32, seed=2)
        mask = mask_24(w.detach().abs())
        lam = 0.25

        def weight_grad(mode, srste_lambda=0.0):
            y = weight_sparse_linear(x, w, b, mask, EMULATED, grad_mode=mode, srste_lambda=srste_lambda)
            return torch.autograd.grad(y, w, gy)[0]

        ste = weight_grad("ste")
        assert torch.equal(weight_grad("masked"), ste * mask)
        assert torch.equal(weight_grad("srste", lam), ste + lam * (~mask) * w.detach())
        assert torch.equal(weight_grad("srste", 0.0), ste)
        assert torch.equal(weight_grad("ste", lam), ste)  # the lambda belongs to srste only

    def test_no_bias_and_frozen_parts(self):
        x, w, _, gy = make_operands((6,), 32, 16, seed=3, bias=False)
        mask = mask_24(w.detach().abs())
        y = weight_sparse_linear(x.detach(), w, None, mask, EMULATED)
        (gw,) = torch.autograd.grad(y, w, gy)
        torch.testing.assert_close(gw, gy.t() @ x.detach(), **TIGHT)
        y = weight_sparse_linear(x, w.detach(), None, mask, EMULATED)
        (gx,) = torch.autograd.grad(y, x, gy)
        torch.testing.assert_close(gx, gy @ (w.detach() * mask), **TIGHT)

    def test_gradcheck_masked_mode_float64(self):
        x, w, b, _ = make_operands((2, 3), 8, 12, seed=4, dtype=torch.float64)
        mask = mask_24(w.detach().abs())
        fn = lambda x, w, b: weight_sparse_linear(x, w, b, mask, EMULATED, grad_mode="masked")
        assert torch.autograd.gradcheck(fn, (x, w, b))

    def test_gradcheck_ste_input_and_bias_float64(self):
        x, w, b, _ = make_operands((5,), 12, 8, seed=5, dtype=torch.float64)
        mask = mask_24(w.detach().abs())
        fn = lambda x, b: weight_sparse_linear(x, w.detach(), b, mask, EMULATED)
        assert torch.autograd.gradcheck(fn, (x, b))

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
    def test_computes_in_the_given_dtype(self, dtype):
        x, w, b, gy = make_operands((4,), 32, 16, seed=6, dtype=dtype)
        y = weight_sparse_linear(x, w, b, mask_24(w.detach().abs()), EMULATED)
        gx, gw, gb = grads(y, gy, x, w, b)
        assert y.dtype == gx.dtype == gw.dtype == gb.dtype == dtype

    def test_autocast_does_not_recast_inside(self):
        x, w, b, gy = make_operands((4,), 32, 16, seed=7)
        mask = mask_24(w.detach().abs())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = weight_sparse_linear(x, w, b, mask, EMULATED)
        assert y.dtype == torch.float32
        torch.testing.assert_close(y, F.linear(x, w * mask, b), **TIGHT)

    def test_fp32_bias_with_bf16_compute(self):
        x, w, _, gy = make_operands((4,), 32, 16, seed=8, dtype=torch.bfloat16)
        b = torch.randn(16, requires_grad=True)
        y = weight_sparse_linear(x, w, b, mask_24(w.detach().abs()), EMULATED)
        (gb,) = torch.autograd.grad(y, b, gy)
        assert y.dtype == torch.bfloat16 and gb.dtype == torch.float32
        torch.testing.assert_close(gb, gy.float().sum(0))

    def test_rejects_bad_arguments(self):
        x, w, b, _ = make_operands((4,), 32, 16, seed=9)
        mask = mask_24(w.detach().abs())
        with pytest.raises(ValueError, match="ste"):
            weight_sparse_linear(x, w, b, mask, EMULATED, grad_mode="dense")
        with pytest.raises(ValueError, match="mask_24"):
            weight_sparse_linear(x, w, b, mask.float(), EMULATED)
        with pytest.raises(ValueError, match="mask_24"):
            weight_sparse_linear(x, w, b, mask[:, :16], EMULATED)
        with pytest.raises(ValueError, match="in_features"):
            weight_sparse_linear(x[:, :16], w, b, mask, EMULATED)
        with pytest.raises(ValueError, match="autocast"):
            weight_sparse_linear(x.bfloat16(), w, b, mask, EMULATED)


def activation_reference(x, w, b, gy, transposable):
    """Output and grads of plain autograd with the activation mask held fixed."""
    x2d = x.detach().reshape(-1, x.shape[-1])
    if transposable:
        padded = F.pad(x2d.abs(), (0, 0, 0, -x2d.shape[0] % 4))
        mask = mask_24_transposable(padded)[: x2d.shape[0]]
    else:
        mask = mask_24(x2d.abs())
    mask = mask.reshape(x.shape)
    y, gx, gw, *gb = masked_dense_reference(x * mask, w, b, torch.ones_like(w, dtype=torch.bool), gy)
    return (y, gx * mask, gw, *gb), mask


class TestActivationSparseLinear:
    @pytest.mark.parametrize("lead, n_in, n_out", SHAPES)
    @pytest.mark.parametrize("transposable", [False, True])
    def test_equals_masked_dense(self, lead, n_in, n_out, transposable):
        x, w, b, gy = make_operands(lead, n_in, n_out, seed=10)
        y = activation_sparse_linear(x, w, b, EMULATED, transposable=transposable)
        got = (y.detach(), *grads(y, gy, x, w, b))
        expected, mask = activation_reference(x, w, b, gy, transposable)
        for g, r in zip(got, expected):
            torch.testing.assert_close(g, r, **TIGHT)
        assert is_24(mask)

    def test_transposable_mask_is_2_of_4_along_tokens_too(self):
        x, w, b, gy = make_operands((3, 4), 64, 32, seed=11)
        _, mask = activation_reference(x, w, b, gy, transposable=True)
        assert is_transposable_24(mask.reshape(12, 64))
        y = activation_sparse_linear(x, w, b, EMULATED, transposable=True)
        (gx,) = torch.autograd.grad(y, x, gy)
        assert torch.equal(gx != 0, mask)  # dX is masked by the very mask the forward used

    def test_ragged_token_count_with_transposable_mask(self):
        x, w, b, gy = make_operands((10,), 64, 32, seed=12)
        y = activation_sparse_linear(x, w, b, EMULATED, transposable=True)
        expected, mask = activation_reference(x, w, b, gy, transposable=True)
        torch.testing.assert_close(y.detach(), expected[0], **TIGHT)
        assert is_24(mask)
        assert (mask[0:4].sum(0) == 2).all() and (mask[4:8].sum(0) == 2).all()
        assert (mask[8:10].sum(0) <= 2).all()  # the last tile was completed with zero rows

    def test_squared_relu_zeros_stay_zero(self):
        x, w, b, gy = make_operands((16,), 64, 32, seed=13)
        h = torch.relu(x.detach()) ** 2
        y = activation_sparse_linear(h, w, b, EMULATED)
        torch.testing.assert_close(y, F.linear(h * mask_24(h), w, b), **TIGHT)

    def test_gradcheck_float64(self):
        x, w, b, _ = make_operands((2, 4), 8, 12, seed=14, dtype=torch.float64)
        for transposable in (False, True):
            fn = lambda x, w, b: activation_sparse_linear(x, w, b, EMULATED, transposable=transposable)
            assert torch.autograd.gradcheck(fn, (x, w, b))

    def test_bf16_and_no_bias(self):
        x, w, _, gy = make_operands((4,), 32, 16, seed=15, dtype=torch.bfloat16, bias=False)
        y = activation_sparse_linear(x, w, None, EMULATED)
        gx, gw = grads(y, gy, x, w)
        assert y.dtype == gx.dtype == gw.dtype == torch.bfloat16

    def test_rejects_mismatched_operands(self):
        x, w, b, _ = make_operands((4,), 32, 16, seed=16)
        with pytest.raises(ValueError, match="in_features"):
            activation_sparse_linear(x[:, :8], w, b, EMULATED)
        with pytest.raises(ValueError, match="compute dtype"):
            activation_sparse_linear(x.half(), w, b, EMULATED)
