"""Dense-equivalent FLOPs of a network: the scale on which dense and sparse runs of one model compare."""
import torch

from sparsetrain.sparse.sparsify import sparse_modules


@torch.no_grad()
def dense_forward_flops(model: torch.nn.Module, x: torch.Tensor) -> float:
    """Forward FLOPs per image with every sparse layer run as its dense op (switched back after)."""
    from torch.utils.flop_counter import FlopCounterMode

    layers = sparse_modules(model)
    was_active = [bool(m.sparse_active) for _, m in layers]
    was_training = model.training
    for _, m in layers:
        m.set_active(False)
    # In eval mode the extra forward draws no dropout / drop-path masks (the RNG stream of the run, and so an
    # exact resume, stays as it was) and moves no BatchNorm statistics.
    model.eval()
    try:
        # force_eager: a compiled model would otherwise compile this one-off eval forward too.
        with FlopCounterMode(display=False) as counter, torch.compiler.set_stance("force_eager"):
            model(x)
    finally:
        model.train(was_training)
        for (_, m), active in zip(layers, was_active):
            m.set_active(active)
    return float(counter.get_total_flops()) / x.shape[0]
