"""LossWatch: the loss's finiteness is recorded without a host read and judged at the optimizer step.

The training-level behaviour (skip drops the update, stop raises before it) is in test_faults.py.
"""
import pytest
import torch

from sparsetrain.training.loss_watch import LossWatch


class OneDevice:
    """A strategy's reduce on one device: the tensor as it is."""

    def reduce(self, tensor, reduce_op="mean"):
        assert reduce_op == "sum"
        return tensor


class TwoRanks:
    """A stand-in for DDP's sum over two ranks where the other rank's loss was not finite."""

    def reduce(self, tensor, reduce_op="mean"):
        assert reduce_op == "sum"
        return tensor + 1


def record(watch, losses, strategy, device="cpu"):
    for step, value in enumerate(losses):
        watch.record(torch.tensor(value, device=device), strategy, step, torch.zeros(1, device=device))


def test_finite_losses_pass_and_each_read_forgets_what_it_read():
    watch = LossWatch()
    record(watch, [1.0, 2.0], OneDevice())
    assert watch.first_nonfinite() is None
    record(watch, [float("nan")], OneDevice())
    assert watch.first_nonfinite().step == 0
    assert watch.first_nonfinite() is None


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_the_first_nonfinite_micro_batch_of_a_step_is_named(bad):
    watch = LossWatch()
    record(watch, [1.0, bad, float("nan")], OneDevice())
    watched = watch.first_nonfinite()
    assert watched.step == 1 and not torch.isfinite(watched.loss)


def test_a_loss_that_is_not_finite_on_another_rank_stops_this_one_too():
    watch = LossWatch()
    record(watch, [1.0], TwoRanks())
    assert watch.first_nonfinite().step == 0


def test_recording_keeps_no_graph_alive():
    watch = LossWatch()
    w = torch.ones(3, requires_grad=True)
    watch.record((w * 2).sum(), OneDevice(), 0, torch.zeros(1))
    assert not watch._pending[0].loss.requires_grad


@pytest.mark.gpu
def test_on_cuda_the_flag_is_copied_to_pinned_memory_and_read_after_its_event():
    watch = LossWatch()
    # A long kernel queued before the loss: recording must return without waiting for it.
    a = torch.randn(4096, 4096, device="cuda")
    for _ in range(20):
        a = a @ a / 64
    loss = a.sum() * float("nan")
    watch.record(loss, OneDevice(), 7, a)
    watched = watch._pending[0]
    assert watched.flag.is_pinned() and watched.copied is not None
    assert watch.first_nonfinite().step == 7
    record(watch, [1.0], OneDevice(), device="cuda")
    assert watch.first_nonfinite() is None
