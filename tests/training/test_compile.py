"""torch.compile of sparse models: the compiled step equals the eager one.

On the CPU the emulated backend runs through inductor for real. The cuSPARSELt path runs on the CPU stand-ins
of tests/gpu/test_backends.py (the GEMM decompresses, the kernel is masks.py + compress_sm90), traced
with fullgraph=True: any graph break in the sparse layers, the autograd Functions or the custom ops
of gpu/ops.py fails the test. Recompiles (phase changes) are allowed; wrong numbers are not.
On a CUDA GPU (`gpu`-marked), a 2:4 MLP on the real cuSPARSELt fast path compiles in one graph.
"""
import copy

import pytest
import torch
from torch import nn

from sparsetrain.gpu.backends import CuSparseLtBackend
from sparsetrain.gpu.ops import opaque_op
from sparsetrain.sparse.block import set_block_level
from sparsetrain.sparse.config import Act24Config, BlockConfig, Semi24Config
from sparsetrain.sparse.layers import SparseLinear
from sparsetrain.sparse.schedules import Phase
from sparsetrain.sparse.sparsify import sparse_modules, sparsify_
from tests.gpu.test_backends import fake_cusparselt, fake_kernels  # noqa: F401 - pytest fixtures
from tests.gpu_checks import assert_close_rel, cuda_randn, needs_cusparselt, require_route

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def tiny_mlp(seed: int, width: int = 64) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, width), nn.ReLU(), nn.Linear(width, 32), nn.ReLU(), nn.Linear(32, 8))


def train_steps(model, optimizer, batches, phases=None):
    """Losses of one SGD step per batch; phases[i] (a Phase or None) is applied before step i."""
    losses = []
    for step, (x, y) in enumerate(batches):
        if phases and phases[step] is not None:
            for _, layer in sparse_modules(model):
                layer.apply_phase(phases[step], step)
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    return torch.stack(losses)


def batches(count: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 32, generator=gen), torch.randint(0, 8, (16,), generator=gen)) for _ in range(count)]


def twins(config, seed=0):
    eager = tiny_mlp(seed)
    sparsify_(eager, config, include=("0", "2"))
    compiled = copy.deepcopy(eager)
    return eager, compiled


def assert_same_state(eager, compiled, tolerance=1e-5):
    for (name, a), (_, b) in zip(eager.state_dict().items(), compiled.state_dict().items()):
        if a.dtype == torch.bool or not a.is_floating_point():
            assert torch.equal(a, b), f"{name} differs between eager and compiled"
        else:
            assert torch.allclose(a, b, atol=tolerance, rtol=tolerance), f"{name} differs between eager and compiled"


DENSE, PRUNE, FROZEN = (Phase(active=False, level=0.0, update_mask=False, name="dense_warmup"),
                        Phase(active=True, level=0.5, update_mask=True, name="pruning"),
                        Phase(active=True, level=0.5, update_mask=False, name="sparse"))


def test_inductor_compiled_semi24_model_matches_eager_through_phase_changes():
    """Dense warm-up, then masks refreshed every step, then frozen: recompiles are fine, the
    losses, weights, masks and flip counts must equal eager's."""
    eager, compiled = twins(Semi24Config(backend="emulated"))
    compiled.compile()
    phases = [DENSE, None, PRUNE, None, FROZEN, None]
    data = batches(len(phases))
    eager_losses = train_steps(eager, torch.optim.SGD(eager.parameters(), lr=0.5), data, phases)
    compiled_losses = train_steps(compiled, torch.optim.SGD(compiled.parameters(), lr=0.5), data, phases)
    assert torch.allclose(eager_losses, compiled_losses, atol=1e-5), (eager_losses, compiled_losses)
    assert_same_state(eager, compiled)
    for (_, a), (_, b) in zip(sparse_modules(eager), sparse_modules(compiled)):
        assert a.pop_flip_rate() == b.pop_flip_rate() > 0
    # evaluation: no refresh, the stored masks
    eager.eval(), compiled.eval()
    x = data[0][0]
    assert torch.allclose(eager(x), compiled(x), atol=1e-5)


def test_compiled_dress_scores_and_level_switches_match_eager():
    eager, compiled = twins(BlockConfig(block_size=8, sparsity=0.5, criterion="scores", backend="emulated"))
    compiled.compile(backend="aot_eager")
    data = batches(4)
    results = []
    for model in (eager, compiled):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        losses = []
        for step, (x, y) in enumerate(data):
            set_block_level(model, (0.5, 0.75)[step % 2])  # multi-subnet DRESS switches levels per forward
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
        results.append(torch.stack(losses))
    assert torch.allclose(*results, atol=1e-5), results
    assert_same_state(eager, compiled)


def cusparselt_layer(config, n_in, n_out, compress, seed):
    torch.manual_seed(seed)
    layer = SparseLinear.from_dense(nn.Linear(n_in, n_out).bfloat16(), config, "fc").train()
    layer.use_backend(CuSparseLtBackend(True, compress, plans=False), "cpu", torch.bfloat16)
    return layer


def forward_backward(layer, x, gy):
    x = x.detach().clone().requires_grad_()
    y = layer(x)
    y.backward(gy)
    return y.detach(), x.grad, layer.weight.grad, layer.bias.grad


@pytest.mark.parametrize("compress", ["kernel", "cslt"])
def test_cusparselt_path_traces_whole_and_matches_eager(fake_cusparselt, fake_kernels, compress):
    eager = cusparselt_layer(Semi24Config(), 192, 128, compress, seed=3)
    compiled = copy.deepcopy(eager)
    compiled.compile(fullgraph=True, backend="aot_eager")
    gen = torch.Generator().manual_seed(4)
    for step in range(2):
        x = torch.randn(3, 20, 192, generator=gen).bfloat16()
        gy = torch.randn(3, 20, 128, generator=gen).bfloat16()
        for got, expected in zip(forward_backward(compiled, x, gy), forward_backward(eager, x, gy)):
            assert torch.equal(got, expected), f"step {step}: compiled differs from eager"
        assert torch.equal(compiled.mask, eager.mask)
        assert torch.equal(compiled.flip_count, eager.flip_count), "the in-place flip count, traced"
        with torch.no_grad():  # new magnitudes, so the next refresh picks a new mask
            for layer in (eager, compiled):
                layer.weight.mul_(-1).add_(0.05)
                layer.weight.grad = layer.bias.grad = None
    assert eager.flip_count > 0
    launches = fake_kernels.launches
    assert launches == (["prune-into"] * 4 if compress == "kernel" else [])  # 2 steps, eager and compiled


@opaque_op("test_write_behind_autograd", lambda t, x: x.new_empty(x.shape), mutates=("t",))
def write_behind_autograd(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    t.data.add_(1)  # as a Triton kernel writes: through the pointer, no version bump of t
    return x * 2


def test_an_op_that_writes_an_input_bumps_its_version_eager_and_compiled():
    t = torch.zeros(3)
    x = torch.ones(3)
    before = t._version
    assert torch.equal(write_behind_autograd(t, x), 2 * x)
    assert t._version > before and torch.equal(t, torch.ones(3))
    compiled = torch.compile(lambda t, x: write_behind_autograd(t, x) + 1, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(t, x), 2 * x + 1)
    assert torch.equal(t, torch.full((3,), 2.0)), "the compiled call writes t as well"


@pytest.mark.parametrize("transposable", [False, True])
@pytest.mark.parametrize("compress", ["kernel", "cslt"])
def test_activation_sparse_path_traces_whole_and_matches_eager(fake_cusparselt, fake_kernels, compress, transposable):
    eager = cusparselt_layer(Act24Config(transposable=transposable), 256, 64, compress, seed=5)
    compiled = copy.deepcopy(eager)
    compiled.compile(fullgraph=True, backend="aot_eager")
    gen = torch.Generator().manual_seed(6)
    x = torch.relu(torch.randn(30, 256, generator=gen)).square().bfloat16()
    gy = torch.randn(30, 64, generator=gen).bfloat16()
    for got, expected in zip(forward_backward(compiled, x, gy), forward_backward(eager, x, gy)):
        assert torch.equal(got, expected)
    assert fake_kernels.launches == (["activations"] * 2 if compress == "kernel" else [])


def test_compile_option_is_checked_and_cpu_runs_stay_eager(tmp_path, caplog):
    from sparsetrain.training.app import ConfigError, train
    from tests.helpers import TINY, compose_cfg
    with pytest.raises(ConfigError, match="compile=fast must be null"):
        train(compose_cfg(["recipe=fmnist_vit_24", *TINY, "compile=fast"], tmp_path / "bad"))
    with caplog.at_level("INFO", logger="sparsetrain"):
        summary = train(compose_cfg(["recipe=fmnist_vit_24", *TINY, "compile=default"], tmp_path / "cpu"))
    assert summary["global_step"] == 2
    assert any("compile=default skipped: training runs on cpu" in r.getMessage() for r in caplog.records)


# ---- on a CUDA GPU: the cuSPARSELt fast path compiles whole ----
# The fused prune+compress kernel and the plan-cache GEMMs are custom ops, so a 2:4 MLP compiles in one graph
# (fullgraph=True, inductor) and its training steps equal eager's (masks bit for bit, tensors within bf16 tolerance).

GPU_TOKENS = 4 * 197


def cuda_mlp_pair():
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Linear(1024, 4096), nn.GELU(), nn.Linear(4096, 1024)).cuda().bfloat16().train()
    sparsify_(eager, Semi24Config(backend="cusparselt"), include=("0", "2"))
    for _, layer in sparse_modules(eager):
        layer.resolve_backend_for("cuda", torch.bfloat16)
    compiled = copy.deepcopy(eager)
    compiled.compile(fullgraph=True)
    return eager, compiled


@pytest.mark.gpu
@needs_cusparselt
@pytest.mark.parametrize("frozen", [False, True], ids=["refresh", "frozen_mask"])
def test_compiled_sparse_mlp_equals_eager(frozen):
    require_route("kernel", plans=True)
    eager, compiled = cuda_mlp_pair()
    for model in (eager, compiled):
        for _, layer in sparse_modules(model):
            layer.set_mask_frozen(frozen)
    x, gy = cuda_randn(GPU_TOKENS, 1024, seed=1), cuda_randn(GPU_TOKENS, 1024, seed=2)
    for step in range(3):
        outputs = []
        for model in (eager, compiled):
            xi = x.clone().requires_grad_()
            y = model(xi)
            y.backward(gy)
            outputs.append((y.detach(), xi.grad, *(p.grad for p in model.parameters())))
        for (name, a), (_, b) in zip(sparse_modules(eager), sparse_modules(compiled)):
            assert torch.equal(a.mask, b.mask), f"step {step} {name}: compiled mask differs"
        for index, (got, expected) in enumerate(zip(outputs[1], outputs[0])):
            assert_close_rel(f"step {step} output {index} compiled vs eager", got, expected, limit=2e-2)
        with torch.no_grad():  # the same new weights in both (their grads differ in rounding), so the next refresh re-prunes
            for model in (eager, compiled):
                for index, p in enumerate(model.parameters()):
                    p.add_(cuda_randn(*p.shape, seed=10 * step + index, scale=0.02))
                    p.grad = None
