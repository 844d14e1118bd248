"""`cuda_graph: true` on a CUDA GPU: training on captured forward+backward graphs equals eager training.

Two copies of one sparse model train side by side on the same batches (AdamW, bf16 autocast without its
cache, as Lightning runs it), one eager and one through GraphedTraining, across the phases a schedule
drives: dense steps, 2:4 refreshes every step, a frozen mask, a refresh again, a frozen mask again;
magnitude block masks updated between steps and DRESS scores that pick the blocks inside a replay (a frozen
graph replayed after either must read the block index of the new mask). Losses, masks and weights must
agree within bf16 tolerance. Then train.py with cuda_graph=true runs a recipe.

    pytest -q -m gpu tests/test_gpu_cuda_graphs.py
"""
import copy
import json

import pytest
import torch
from timm.layers import Mlp
from torch import nn

from sparsetrain.sparse import BlockConfig, Semi24Config, sparse_modules, sparsify_
from sparsetrain.training.cuda_graphs import GraphedTraining
from tests.test_gpu_fastpath import relative_error

pytestmark = pytest.mark.gpu

TOKENS = 4 * 197
FROZEN_STEPS = (4, 5, 7)


def _require_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


def _model(config) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(Mlp(1024, 4096), Mlp(1024, 4096), nn.Linear(1024, 16)).cuda()
    sparsify_(model, config, include=["0.*", "1.*"])
    for _, layer in sparse_modules(model):
        layer.resolve_backend_for("cuda", torch.bfloat16)
    return model.train()


def _phase(model, step: int, block: bool) -> None:
    """What SparsityScheduler would do before `step`: dense, then sparse with refresh, frozen, refresh, frozen."""
    for _, layer in sparse_modules(model):
        layer.set_active(step >= 2)
        layer.set_mask_frozen(step in FROZEN_STEPS)
        if block and step >= 2 and step not in FROZEN_STEPS and layer.sparse_config.criterion == "magnitude":
            layer.update_mask()  # magnitude block masks are recomputed outside the forward


@pytest.mark.parametrize("config", [
    Semi24Config(backend="cusparselt"),
    BlockConfig(block_size=64, sparsity=0.9, backend="triton_bsr"),
    BlockConfig(block_size=64, sparsity=0.9, backend="triton_bsr", criterion="scores"),
], ids=["semi24", "block-magnitude", "block-dress"])
def test_graphed_training_equals_eager_across_phases(config):
    _require_cuda()
    eager = _model(config)
    graphed = copy.deepcopy(eager)
    graphs = GraphedTraining(graphed)
    graphs.install()
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (eager, graphed)]
    generator = torch.Generator(device="cuda").manual_seed(0)
    block = isinstance(config, BlockConfig)
    for step in range(8):
        x = torch.randn(TOKENS, 1024, device="cuda", generator=generator)
        target = torch.randint(0, 16, (TOKENS,), device="cuda", generator=generator)
        losses = []
        for model, optimizer in zip((eager, graphed), optimizers):
            _phase(model, step, block)
            with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
                loss = nn.functional.cross_entropy(model(x).float(), target)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach())
        assert torch.isfinite(losses[1]), f"step {step}: graphed loss {losses[1]}"
        assert relative_error(losses[1], losses[0]) < 2e-2, f"step {step}: losses {losses[0]} vs {losses[1]}"
    for (name, a), (_, b) in zip(sparse_modules(eager), sparse_modules(graphed)):
        assert (a.mask != b.mask).float().mean() < 1e-3, f"{name}: masks differ"
    for (name, p), q in zip(eager.named_parameters(), graphed.parameters()):
        assert relative_error(q, p) < 2e-2, name
    # dense steps, refresh steps and frozen steps: three keys, each captured once (at its second step)
    assert graphs.captured == 3 and "forward" in graphed.__dict__


@pytest.mark.parametrize("criterion", ["magnitude", "scores"])
def test_frozen_phase_replays_one_graph_without_rebuilding_the_index(criterion):
    """A gradual ramp frozen where it ends (the block recipes' schedule): after the freeze every step replays one
    graph, the kernels' block index is never rebuilt, pruned blocks get no weight gradient (the block-sparse weight
    gradient), and the graphed model trains as the eager one does."""
    _require_cuda()
    from sparsetrain.sparse.schedules import PruneSchedule

    config = BlockConfig(block_size=64, sparsity=0.9, backend="triton_bsr", criterion=criterion)
    schedule = PruneSchedule(kind="gradual", pattern="block", target=0.9, end_step=3, update_every=1,
                             freeze_after_ramp=True)
    eager = _model(config)
    graphed = copy.deepcopy(eager)
    graphs = GraphedTraining(graphed)
    graphs.install()
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (eager, graphed)]
    generator = torch.Generator(device="cuda").manual_seed(0)
    indexes = None
    for step in range(9):
        x = torch.randn(TOKENS, 1024, device="cuda", generator=generator)
        target = torch.randint(0, 16, (TOKENS,), device="cuda", generator=generator)
        losses = []
        for model, optimizer in zip((eager, graphed), optimizers):
            for _, layer in sparse_modules(model):
                layer.apply_phase(schedule.phase(step), step)
            with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
                loss = nn.functional.cross_entropy(model(x).float(), target)
            loss.backward()
            if step > 3:
                for name, layer in sparse_modules(model):
                    assert not layer.weight.grad[~layer.mask].any(), f"step {step}: {name} pruned blocks got a gradient"
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach())
        assert relative_error(losses[1], losses[0]) < 2e-2, f"step {step}: losses {losses[0]} vs {losses[1]}"
        if step == 5:  # the frozen phase's second step: its key is captured, and replayed from here on
            captured, indexes = graphs.captured, [layer._block_index for _, layer in sparse_modules(graphed)]
    assert graphs.captured == captured, "the frozen phase captured more than one graph"
    assert all(layer._block_index is index for (_, layer), index in zip(sparse_modules(graphed), indexes))


def test_train_py_recipe_runs_on_captured_graphs(tmp_path, caplog):
    _require_cuda()
    from sparsetrain.training.app import train
    from tests.helpers import TINY, compose_cfg
    on_gpu = [o for o in TINY if not o.startswith(("trainer.accelerator=", "trainer.precision="))]
    cfg = compose_cfg(["recipe=fmnist_vit_24", *on_gpu, "trainer.precision=bf16-mixed", "trainer.max_steps=6",
                       "data.img_size=28", "sparsity.backend=cusparselt", "model.embed_dim=256", "cuda_graph=true"],
                      tmp_path)
    with caplog.at_level("INFO", logger="sparsetrain"):
        summary = train(cfg)
    assert summary["global_step"] == 6 and summary["images_per_second"]
    assert any("cuda_graph: capture" in record.message for record in caplog.records)
    rows = [row for row in json.loads((tmp_path / "layers.json").read_text()) if row["pattern"] == "semi24"]
    assert rows and all(row["backend"] == "cusparselt" for row in rows), rows
