"""The fast path's opaque GPU calls as torch.library custom ops, so torch.compile traces the sparse layers.

Dynamo cannot look inside a Triton launcher, a ctypes call into cuSPARSELt or the algorithm cache,
so each such call is registered as a custom op (namespace `sparsetrain`) with a fake implementation
that only gives output shapes. The autograd Functions in `functions.py` then trace without graph
breaks, and inductor fuses the dense work (casts, bias grads, the masked weight grad) around them.

Eager code calls the same Python function directly: a trip through the op dispatcher costs about
5-9 us of host time per call (measured on the CPU machine), and eager 2:4 training is host-bound.
"""
import functools
from collections.abc import Callable

import torch

NAMESPACE = "sparsetrain"


def opaque_op(name: str, fake: Callable) -> Callable[[Callable], Callable]:
    """Register the decorated function as the custom op `sparsetrain::<name>`, with `fake` (same
    signature, returns empty tensors of the output shapes) for tracing. The function it returns
    runs the op while torch.compile traces and the plain function otherwise.

    The decorated function must annotate every argument (the op's schema is inferred from them),
    return new tensors (never an input or a view of one) and leave its inputs unchanged.
    """
    def register(implementation: Callable) -> Callable:
        op = torch.library.custom_op(f"{NAMESPACE}::{name}", implementation, mutates_args=())
        op.register_fake(fake)

        @functools.wraps(implementation)
        def call(*args):
            if torch.compiler.is_compiling():
                return op(*args)
            return implementation(*args)

        return call

    return register
