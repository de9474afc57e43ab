"""Launch plans: the engine's forward resolved once per input signature, then replayed.

The first forward with a new input signature (shape, strides, offset, device) runs each op through its
``*_plan`` function (``PLANS``): the op's checks, launch configuration, grid, scalar arguments and output
shapes are resolved into a plan, which is recorded and called. Every later forward with that signature
replays the recorded plans in order: the steps' own code runs again (views, and branches that depend on
shapes only, so on the signature), but each op call is an allocation and ``kernel.run`` with nothing
left to decide: no checks, no configuration rules, no environment reads, and no custom-op dispatch.
Rules the steps ask (fuse the inverted residual or not) go through ``run`` as well and are answered once.

Why replaying by position is sound: a step's calls, and every tensor's shape, strides and offset
inside the forward, follow from the input's signature alone (kernel outputs are fresh, contiguous
allocations; everything else is a view). ``CheckedReplay`` (``Engine.check_replays``, on in the tests)
compares each replayed call's op and tensor metadata with the recorded ones.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Tuple

import torch

from ..ops import aspp, attention, conv, dwconv, gemm, labels, mv2_block, pool, sepattn

# op -> the function that resolves it once; called with the op's arguments it returns a callable that takes
# the same arguments. Ops without one (the CUDA extension's depthwise) are called as they are.
PLANS: Dict[Callable, Callable] = {
    gemm.linear: gemm.linear_plan,
    conv.conv3x3: conv.conv3x3_plan,
    dwconv.dwconv3x3: dwconv.dwconv3x3_plan,
    mv2_block.inverted_residual: mv2_block.inverted_residual_plan,
    attention.patch_attention: attention.patch_attention_plan,
    sepattn.sepattn_context: sepattn.sepattn_context_plan,
    pool.classifier: pool.classifier_plan,
    pool.pool_linear: pool.pool_linear_plan,
    aspp.pointwise: aspp.pointwise_plan,
    labels.bilinear_argmax: labels.bilinear_argmax_plan,
}


class Resolved:
    """The plan of a rule (a decision that reads only the signature, not a launch): its answer, fixed."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value

    def __call__(self, *args, **kwargs):
        return self.value


def resolve_once(rule: Callable) -> Callable:
    """A ``PLANS`` entry for ``rule``: asked when a signature is recorded, its answer replayed."""
    return lambda *args, **kwargs: Resolved(rule(*args, **kwargs))


# Rules a step asks through ``run`` (``if run(rule, ...)``) so that they are answered once per signature.
PLANS[mv2_block.fuse_choice] = resolve_once(mv2_block.fuse_choice)

Call = Tuple[Callable, Callable, tuple]  # (op, its plan, the tensor metadata it was resolved for)


def direct(op, *args, **kwargs):
    """Call the op itself (registered custom ops: what torch.compile traces)."""
    return op(*args, **kwargs)


def _metadata(args, kwargs) -> tuple:
    return tuple((tuple(t.shape), t.stride(), t.storage_offset(), t.dtype, t.device)
                 for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor))


class Recorder:
    """First forward of a signature: resolve each op's plan, keep it, run it."""

    def __init__(self):
        self.calls: List[Call] = []

    def __call__(self, op, *args, **kwargs):
        resolve = PLANS.get(op)
        plan = resolve(*args, **kwargs) if resolve is not None else op
        self.calls.append((op, plan, _metadata(args, kwargs)))
        return plan(*args, **kwargs)


class Replay:
    """Later forwards: the recorded plans, in order."""

    __slots__ = ("_next",)

    def __init__(self, plans: List[Callable]):
        self._next = iter(plans).__next__

    def __call__(self, op, *args, **kwargs):
        return self._next()(*args, **kwargs)


class CheckedReplay:
    """A replay that first checks each call against the recording: the same op, tensors with the same
    shapes, strides, offsets, dtypes and devices (for tests and debugging)."""

    def __init__(self, calls: List[Call]):
        self.calls, self.index = calls, 0

    def __call__(self, op, *args, **kwargs):
        if self.index >= len(self.calls):
            raise RuntimeError(f"launch plan replay: call {self.index} ({op}) was not recorded")
        recorded_op, plan, meta = self.calls[self.index]
        got = _metadata(args, kwargs)
        if recorded_op is not op or got != meta:
            raise RuntimeError(f"launch plan replay diverged at call {self.index}: recorded {recorded_op} with "
                               f"{meta}, replayed {op} with {got}")
        self.index += 1
        return plan(*args, **kwargs)

    def finish(self) -> None:
        if self.index != len(self.calls):
            raise RuntimeError(f"launch plan replay made {self.index} of {len(self.calls)} recorded calls")


__all__ = ["PLANS", "Resolved", "resolve_once", "direct", "Recorder", "Replay", "CheckedReplay"]
