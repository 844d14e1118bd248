"""torch.compile of the cuSPARSELt fast path on a CUDA GPU: the fused prune+compress kernel and the
plan-cache GEMMs are custom ops, so a 2:4 MLP compiles in one graph (fullgraph=True, inductor) and
its training steps equal eager's (masks bit for bit, tensors within bf16 tolerance).

    pytest -q -m gpu tests/test_gpu_compile.py
"""
import copy

import pytest
import torch
from torch import nn

from sparsetrain.sparse.config import Semi24Config
from sparsetrain.sparse.sparsify import sparse_modules, sparsify_
from tests.test_gpu_fastpath import assert_close_rel, randn, require

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.backends.cusparselt.is_available(), reason="this torch build has no cuSPARSELt"),
]

TOKENS = 4 * 197


def mlp_pair():
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Linear(1024, 4096), nn.GELU(), nn.Linear(4096, 1024)).cuda().bfloat16().train()
    sparsify_(eager, Semi24Config(backend="cusparselt"), include=("0", "2"))
    for _, layer in sparse_modules(eager):
        layer.resolve_backend_for("cuda", torch.bfloat16)
    compiled = copy.deepcopy(eager)
    compiled.compile(fullgraph=True)
    return eager, compiled


@pytest.mark.parametrize("frozen", [False, True], ids=["refresh", "frozen_mask"])
def test_compiled_sparse_mlp_equals_eager(frozen):
    require("kernel", plans=True)
    eager, compiled = mlp_pair()
    for model in (eager, compiled):
        for _, layer in sparse_modules(model):
            layer.set_mask_frozen(frozen)
    x, gy = randn(TOKENS, 1024, seed=1), randn(TOKENS, 1024, seed=2)
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
                    p.add_(randn(*p.shape, seed=10 * step + index, scale=0.02))
                    p.grad = None
