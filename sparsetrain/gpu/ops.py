"""The fast path's opaque GPU calls as torch.library custom ops, so torch.compile traces the sparse layers.

Dynamo cannot look inside a Triton launcher, a ctypes call into cuSPARSELt or the algorithm cache,
so each such call is registered as a custom op (namespace `sparsetrain`) with a fake implementation
that only gives output shapes. The autograd Functions in `functions.py` then trace without graph
breaks, and inductor fuses the dense work (casts, bias grads, the masked weight grad) around them.

Eager code calls the same Python function directly: a trip through the op dispatcher adds host time to every
call, and eager 2:4 training is host-bound (`scripts/profile_host.py`).
"""
import functools
import inspect
from collections.abc import Callable

import torch

NAMESPACE = "sparsetrain"


def opaque_op(name: str, fake: Callable, mutates: tuple[str, ...] = ()) -> Callable[[Callable], Callable]:
    """Register the decorated function as the custom op `sparsetrain::<name>`, with `fake` (same
    signature, returns empty tensors of the output shapes) for tracing. The function it returns
    runs the op while torch.compile traces and the plain function otherwise.

    The decorated function must annotate every argument (the op's schema is inferred from them) and
    return new tensors (never an input or a view of one). It leaves its inputs unchanged except those
    named in `mutates`, which it writes in place; the eager call then bumps their version counters,
    as the op would, so autograd still sees the writes.
    """
    def register(implementation: Callable) -> Callable:
        op = torch.library.custom_op(f"{NAMESPACE}::{name}", implementation, mutates_args=mutates)
        op.register_fake(fake)
        positions = [i for i, arg in enumerate(inspect.signature(implementation).parameters) if arg in mutates]

        @functools.wraps(implementation)
        def call(*args):
            if torch.compiler.is_compiling():
                return op(*args)
            result = implementation(*args)
            for i in positions:
                torch.autograd.graph.increment_version(args[i])
            return result

        return call

    return register
