"""The best checkpoints (checkpoints/step*.ckpt) are ranked by a validation of the model each one holds."""
from sparsetrain.training.app import train
from tests.helpers import TINY, compose_cfg


def test_an_epoch_that_max_steps_cuts_short_is_not_ranked_by_an_older_validation(tmp_path):
    # 8 batches per epoch: a validation at step 8, then the run stops at step 12, in the middle of the second epoch
    train(compose_cfg(["recipe=fmnist_dense", *TINY, "model.depth=1", "trainer.max_epochs=2", "trainer.max_steps=12",
                       "callbacks.checkpoint.save_top_k=2"], tmp_path))

    assert sorted(path.name for path in (tmp_path / "checkpoints").glob("step*.ckpt")) == ["step0000008.ckpt"]
