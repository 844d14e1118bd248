"""The OmegaConf resolvers the configs use."""
import pytest
import torch

from sparsetrain.training.resolvers import if_cuda
from tests.helpers import compose_cfg


@pytest.mark.parametrize("accelerator, cuda_visible, picked", [
    ("auto", True, "gpu"), ("gpu", True, "gpu"), ("cuda", True, "gpu"),
    ("cpu", True, "cpu"), ("auto", False, "cpu"), ("gpu", False, "cpu"),
])
def test_if_cuda_picks_by_where_the_run_trains(accelerator, cuda_visible, picked, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda_visible)
    assert if_cuda(accelerator, "gpu", "cpu") == picked


@pytest.mark.parametrize("cuda_visible, precision, backend", [(True, "bf16-mixed", "triton_bsr"),
                                                               (False, "32-true", "auto")])
def test_the_block_recipe_runs_the_kernels_on_a_gpu_and_masked_dense_on_a_cpu(cuda_visible, precision, backend,
                                                                             monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda_visible)
    cfg = compose_cfg(["recipe=fmnist_vit_block"], tmp_path)
    assert (cfg.trainer.precision, cfg.sparsity.backend) == (precision, backend)
