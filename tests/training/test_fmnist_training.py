"""Short training runs on real Fashion-MNIST (Debian's files): accuracy must rise well above chance,
and 2:4 (emulated backend on the CPU) must land within a few points of dense."""
import json
from pathlib import Path

import pytest

from sparsetrain.training.app import train
from tests.helpers import compose_cfg

FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
SHORT = ["data.subset=9600", "data.num_workers=0", "data.batch_size=64", "trainer.max_epochs=1",
         "trainer.limit_val_batches=40", "trainer.enable_progress_bar=false", "sched.warmup_steps=15",
         "optim.lr=1e-3", "data.augment=false"]


@pytest.mark.skipif(not FMNIST.is_file(), reason="apt-get install dataset-fashion-mnist (scripts/setup.sh does)")
def test_fmnist_vit_24_learns_real_data_within_a_few_points_of_dense(tmp_path):
    dense = train(compose_cfg(["recipe=fmnist_dense", *SHORT], tmp_path / "dense"))
    sparse = train(compose_cfg(["recipe=fmnist_vit_24", *SHORT], tmp_path / "sparse"))
    assert sparse["global_step"] == dense["global_step"] == 9600 // 64
    dense_acc, sparse_acc = dense["metrics"]["val/acc"], sparse["metrics"]["val/acc"]
    assert sparse_acc > 0.6, sparse["metrics"]  # chance is 0.1
    assert dense_acc - sparse_acc < 0.05, (dense_acc, sparse_acc)
    layers = json.loads((tmp_path / "sparse" / "layers.json").read_text())
    sparse_layers = [r for r in layers if r["pattern"] == "semi24"]
    assert len(sparse_layers) == 24 and all(abs(r["measured_sparsity"] - 0.5) < 1e-6 for r in sparse_layers)
