"""The `cuda_graph:` option.

On the CPU, its bookkeeping: which forwards capture, which replay, which run eager. A stand-in capture (it runs
the module's own forward and counts) takes the place of torch.cuda.make_graphed_callables.

On a CUDA GPU (`gpu`-marked): training on captured forward+backward graphs equals eager training. Two copies of
one sparse model train side by side on the same batches (AdamW, bf16 autocast without its cache, as Lightning runs
it), one eager and one through GraphedTraining, across the phases a schedule drives: dense steps, 2:4 refreshes
every step, a frozen mask, a refresh again, a frozen mask again; magnitude block masks updated between steps and
DRESS scores that pick the blocks inside a replay (a frozen graph replayed after either must read the block index
of the new mask). Losses, masks and weights must agree within bf16 tolerance. Then train.py with cuda_graph=true
runs a recipe.
"""
import copy
import json

import pytest
import torch
from timm.layers import Mlp
from torch import nn

from sparsetrain.sparse import Act24Config, BlockConfig, Semi24Config, sparse_modules, sparsify_
from sparsetrain.training import cuda_graphs
from sparsetrain.training.app import ConfigError, train, validate_config
from sparsetrain.training.cuda_graphs import GraphedTraining
from tests.gpu_checks import relative_error
from tests.helpers import TINY, compose_cfg


class CountingCapture:
    """capture(model, x) -> a 'graph' that runs the module's own forward and counts its replays."""

    def __init__(self):
        self.keys, self.replays = [], 0

    def __call__(self, model, x):
        assert "forward" not in model.__dict__, "capture must call the module's own forward"
        self.keys.append(cuda_graphs.graph_key([layer for _, layer in sparse_modules(model)], x))

        def replay(inputs):
            self.replays += 1
            return type(model).forward(model, inputs)
        return replay


def sparse_mlp():
    torch.manual_seed(0)
    model = nn.Sequential(Mlp(64, 128), nn.Linear(64, 10))
    sparsify_(model, Semi24Config(), include=["0.*"])
    return model.train()


def test_a_key_runs_eager_once_then_captures_and_replays():
    model, capture = sparse_mlp(), CountingCapture()
    graphs = GraphedTraining(model, capture)
    graphs.install()
    x = torch.randn(8, 64)
    expected = type(model).forward(model, x)
    torch.testing.assert_close(model(x), expected)
    assert capture.keys == [] and capture.replays == 0  # a new key: eager
    torch.testing.assert_close(model(x), expected)
    model(x).sum().backward()
    assert len(capture.keys) == 1 and capture.replays == 2
    assert model[0].fc1.weight.grad is not None  # autograd runs through the replayed forward
    assert (graphs.steps, graphs.replayed, graphs.captured) == (3, 2, 1)


def test_a_key_that_never_repeats_is_never_captured():
    """A block level ramping at every step: capturing each would cost several eager steps each."""
    model, capture = sparse_mlp(), CountingCapture()
    graphs = GraphedTraining(model, capture)
    graphs.install()
    for rows in range(1, 20):  # a new batch shape each step: a new key each step
        model(torch.randn(rows, 64))
    assert capture.keys == [] and graphs.replayed == 0 and graphs.steps == 19


def test_each_phase_input_shape_and_autocast_gets_its_own_graph():
    model, capture = sparse_mlp(), CountingCapture()
    GraphedTraining(model, capture).install()
    layers = [layer for _, layer in sparse_modules(model)]
    x = torch.randn(8, 64)

    def twice(inputs):
        model(inputs)
        model(inputs)
    twice(x)
    for layer in layers:
        layer.set_mask_frozen(True)
    twice(x)
    for layer in layers:
        layer.set_mask_frozen(False)
    model(x)  # back to the first key: a replay, no capture
    layers[0].set_active(False)
    twice(x)
    twice(torch.randn(5, 64))  # the smaller last batch
    with torch.autocast("cpu", dtype=torch.bfloat16):
        twice(x)
    assert len(capture.keys) == 5 and len(set(capture.keys)) == 5
    assert capture.replays == 6


def test_eval_and_no_grad_forwards_run_eager():
    model, capture = sparse_mlp(), CountingCapture()
    GraphedTraining(model, capture).install()
    x = torch.randn(8, 64)
    with torch.no_grad():
        model(x)
    model.eval()
    model(x)
    assert capture.keys == [] and capture.replays == 0


def test_state_dict_is_untouched_and_uninstall_restores_the_class_forward():
    model, capture = sparse_mlp(), CountingCapture()
    keys = list(model.state_dict())
    graphs = GraphedTraining(model, capture)
    graphs.install()
    x = torch.randn(8, 64)
    model(x)
    model(x)
    assert list(model.state_dict()) == keys
    model.load_state_dict(model.state_dict())
    graphs.uninstall()
    assert "forward" not in model.__dict__ and graphs.graphs == {}
    model(x)
    assert capture.replays == 1  # the replay before uninstall only


def test_the_oldest_graph_is_dropped_beyond_the_limit(monkeypatch):
    monkeypatch.setattr(cuda_graphs, "MAX_GRAPHS", 2)
    model, capture = sparse_mlp(), CountingCapture()
    graphs = GraphedTraining(model, capture)
    graphs.install()
    for rows in (1, 2, 3, 1):
        model(torch.randn(rows, 64))
        model(torch.randn(rows, 64))
    assert len(graphs.graphs) == 2 and len(capture.keys) == 4  # rows=1 was dropped, so it captured again


def test_block_levels_are_part_of_the_key():
    torch.manual_seed(0)
    model = nn.Sequential(Mlp(64, 128))
    sparsify_(model, BlockConfig(block_size=16, sparsity=0.5), skip_dense_by_default=False)
    capture = CountingCapture()
    GraphedTraining(model.train(), capture).install()
    x = torch.randn(4, 64)
    model(x)
    model(x)
    for _, layer in sparse_modules(model):
        layer.set_level(0.75)
    model(x)
    model(x)
    assert len(capture.keys) == 2


@pytest.mark.parametrize("config", [Semi24Config(), Act24Config(), BlockConfig(block_size=16, sparsity=0.5)],
                         ids=["semi24", "act24", "block"])
def test_every_pattern_gives_a_graph_key(config):
    model = nn.ModuleDict({"mlp": Mlp(64, 128)})  # act24 takes `*mlp.fc2` only
    sparsify_(model, config, skip_dense_by_default=False)
    layers = [layer for _, layer in sparse_modules(model)]
    assert layers and cuda_graphs.graph_key(layers, torch.randn(4, 64)) == cuda_graphs.graph_key(layers, torch.randn(4, 64))


@pytest.mark.parametrize("overrides, message", [
    (["compile=default"], "use one of them"),
    (["+trainer.accumulate_grad_batches=2"], "accumulate_grad_batches"),
    (["sparsity=dress_multi", "prune_schedule=constant"], "multi-subnet"),
    (["cuda_graph=maybe"], "must be true, false or auto"),
])
def test_settings_graphs_cannot_serve_are_refused_with_the_fix(overrides, message, tmp_path):
    cfg = compose_cfg(["recipe=fmnist_vit_24", *TINY, "cuda_graph=true", *overrides], tmp_path)
    with pytest.raises(ConfigError, match=message):
        validate_config(cfg)


def test_a_cpu_run_with_cuda_graph_trains_eager(tmp_path, caplog):
    cfg = compose_cfg(["recipe=fmnist_vit_24", *TINY, "cuda_graph=true"], tmp_path)
    with caplog.at_level("INFO", logger="sparsetrain"):
        summary = train(cfg)
    assert summary["global_step"] == 2
    assert any("cuda_graph skipped: training runs on cpu" in record.message for record in caplog.records)


@pytest.mark.parametrize("overrides, graphs", [
    ([], True),
    (["compile=default"], False),
    (["+trainer.accumulate_grad_batches=2"], False),
])
def test_auto_uses_graphs_unless_the_config_conflicts(overrides, graphs, tmp_path, caplog):
    cfg = compose_cfg(["recipe=fmnist_vit_24", *TINY, "cuda_graph=auto", *overrides], tmp_path)
    validate_config(cfg)  # auto never refuses a config
    with caplog.at_level("INFO", logger="sparsetrain"):
        assert cuda_graphs.graphs_wanted(cfg) == graphs
    assert any("cuda_graph=auto: eager steps" in record.message for record in caplog.records) != graphs


def test_auto_trains_eager_on_several_ranks_where_true_stops(caplog):
    class Ranks:
        world_size = 2
    module = type("Module", (), {"device": torch.device("cuda"), "model": nn.Linear(2, 2)})()
    with caplog.at_level("INFO", logger="sparsetrain"):
        cuda_graphs.CudaGraphSteps(required=False).on_fit_start(Ranks(), module)
    assert any("eager steps on 2 ranks" in record.message for record in caplog.records)
    with pytest.raises(ValueError, match="set cuda_graph=false"):
        cuda_graphs.CudaGraphSteps(required=True).on_fit_start(Ranks(), module)


def test_replays_find_every_block_index_up_to_date():
    """A mask changed between steps (a schedule update): the graph must not replay on the old index."""
    pytest.importorskip("triton")
    torch.manual_seed(0)
    model = nn.Sequential(Mlp(64, 128), nn.Linear(64, 10))
    sparsify_(model, BlockConfig(block_size=16, sparsity=0.5), include=["0.*"])
    layers = [layer for _, layer in sparse_modules(model.train())]
    for layer in layers:
        layer.block_kernel_operands(torch.float32)  # what a first forward on the kernels builds

    def capture(module, x):
        def replay(inputs):
            assert all(layer._block_index_current() for layer in layers), "replayed on a stale block index"
            return type(module).forward(module, inputs)
        return replay
    GraphedTraining(model, capture).install()
    x = torch.randn(8, 64)
    model(x)
    model(x)
    with torch.no_grad():
        for layer in layers:
            layer.weight.mul_(torch.rand_like(layer.weight))
            layer.update_mask()
    model(x)


def test_no_garbage_collection_runs_while_a_graph_is_captured(monkeypatch):
    """A collection that frees an old graph mid-capture destroys it there, which fails the capture."""
    import gc
    seen = []

    def fake_make_graphed_callables(model, sample_args, **kwargs):
        seen.append(gc.isenabled())
        model.forward = lambda x: type(model).forward(model, x)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: "pool")
    monkeypatch.setattr(torch.cuda, "make_graphed_callables", fake_make_graphed_callables)
    model = sparse_mlp()
    assert gc.isenabled()
    replay = cuda_graphs.CudaGraphCapture()(model, torch.randn(8, 64))
    assert seen == [False] and gc.isenabled() and callable(replay)


# ---- on a CUDA GPU: real graphs against eager ----

TOKENS = 4 * 197
FROZEN_STEPS = (4, 5, 7)


def _cuda_model(config) -> nn.Module:
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


@pytest.mark.gpu
@pytest.mark.parametrize("config", [
    Semi24Config(backend="cusparselt"),
    BlockConfig(block_size=64, sparsity=0.9, backend="triton_bsr"),
    BlockConfig(block_size=64, sparsity=0.9, backend="triton_bsr", criterion="scores"),
], ids=["semi24", "block-magnitude", "block-dress"])
def test_graphed_training_equals_eager_across_phases(config):
    eager = _cuda_model(config)
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


@pytest.mark.gpu
@pytest.mark.parametrize("criterion", ["magnitude", "scores"])
def test_frozen_phase_replays_one_graph_without_rebuilding_the_index(criterion):
    """A gradual ramp frozen where it ends (the block recipes' schedule): after the freeze every step replays one
    graph, the kernels' block index is never rebuilt, pruned blocks get no weight gradient (the block-sparse weight
    gradient), and the graphed model trains as the eager one does."""
    from sparsetrain.sparse.schedules import PruneSchedule

    config = BlockConfig(block_size=64, sparsity=0.9, backend="triton_bsr", criterion=criterion)
    schedule = PruneSchedule(kind="gradual", pattern="block", target=0.9, end_step=3, update_every=1,
                             freeze_after_ramp=True)
    eager = _cuda_model(config)
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


@pytest.mark.gpu
def test_train_py_recipe_runs_on_captured_graphs(tmp_path, caplog):
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
