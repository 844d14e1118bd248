"""BatchNorm statistics re-estimated under the current masks: the averages are the batches', training is untouched."""
import pytest
import torch
from hydra.utils import instantiate
from torch import nn

from sparsetrain.export import network_state, rebuild_trained_model
from sparsetrain.training.app import train
from sparsetrain.training.bn_recalibration import BatchNormRecalibration, recalibrate_batchnorm
from tests.helpers import TINY, compose_cfg


class ModeProbe(nn.Module):
    """Identity that records whether it was in training mode when called."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append(self.training)
        return x


def test_running_statistics_become_the_plain_average_of_the_batches():
    torch.manual_seed(0)
    conv, norm, probe = nn.Conv2d(3, 8, 1, bias=False), nn.BatchNorm2d(8, momentum=0.3), ModeProbe()
    model = nn.Sequential(conv, norm, probe, nn.Dropout(0.5)).train()
    norm.running_mean.fill_(5.0)
    batches = [torch.randn(4, 3, 5, 5) * (i + 1) + i for i in range(3)]

    assert recalibrate_batchnorm(model, batches) == 3

    with torch.no_grad():
        features = [conv(x) for x in batches]
    mean = torch.stack([f.mean(dim=(0, 2, 3)) for f in features]).mean(0)
    var = torch.stack([f.transpose(0, 1).flatten(1).var(dim=1, unbiased=True) for f in features]).mean(0)
    torch.testing.assert_close(norm.running_mean, mean)
    torch.testing.assert_close(norm.running_var, var)
    assert probe.seen == [False, False, False]  # everything but the BatchNorm ran in eval mode
    assert model.training and norm.training and norm.momentum == 0.3  # modes and momentum restored


def test_an_empty_calibration_loader_is_an_error_that_names_the_fix():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match="bn_recalibration_batches"):
        recalibrate_batchnorm(model, [])


def test_zero_batches_is_refused_at_construction():
    with pytest.raises(ValueError, match="0 in the config"):
        BatchNormRecalibration(0)


RESNET_BLOCKS = ["recipe=fmnist_resnet_24", *TINY, "sparsity=block", "sparsity.block_size=16", "sparsity.sparsity=0.8",
                 "prune_schedule=constant", "trainer.max_steps=3"]


def is_batchnorm_statistic(key):
    return key.endswith(("running_mean", "running_var", "num_batches_tracked"))


def test_a_sparse_resnet_trains_the_same_and_saves_statistics_of_its_final_masks(tmp_path):
    off_cfg = compose_cfg([*RESNET_BLOCKS, "callbacks.bn_recalibration_batches=0"], tmp_path / "off")
    train(off_cfg)
    train(compose_cfg([*RESNET_BLOCKS, "callbacks.bn_recalibration_batches=2"], tmp_path / "on"))
    off = torch.load(tmp_path / "off" / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    on = torch.load(tmp_path / "on" / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]

    # Training never reads running statistics and the calibration draws nothing from the global RNG: the
    # weights, masks and scores of both runs are identical.
    for key in off:
        if not is_batchnorm_statistic(key):
            torch.testing.assert_close(on[key], off[key], rtol=0, atol=0, msg=key)

    # last.ckpt holds the statistics of the final network on the calibration batches.
    model = rebuild_trained_model(off_cfg, network_state({"state_dict": off}), tmp_path / "off", tmp_path / "off")
    data = instantiate(off_cfg.data)
    data.setup("fit")
    recalibrate_batchnorm(model, (x for x, _ in data.calibration_dataloader(2)))
    expected = {f"model.{k}": v for k, v in model.state_dict().items() if is_batchnorm_statistic(k)}
    changed = 0
    for key, value in expected.items():
        torch.testing.assert_close(on[key], value, msg=key)
        changed += key.endswith("running_mean") and not torch.equal(on[key], off[key])
    assert changed > 10  # most of ResNet-50's BatchNorms moved
