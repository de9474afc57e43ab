"""``fastmvit::pointwise``: the DeepLabV3 head's 1x1 convolutions, over up to four NHWC inputs at once.

Public API (the engine's contract)::

    packed = gemm.pack_linear(weight, bias, dtype=dtype, device=device)   # weight [N, n * K(, 1, 1)], BN folded
    y = pointwise(x0, x1, x2, x3, packed=packed, image_bias=ib, relu=True)  # the ASPP projection
    y = pointwise(x, packed=packed, relu=True)                              # the 1x1 ASPP branch
    y = pointwise(x, packed=packed, relu=False)                             # the classifier
    #   xi [B, H, W, K], one dtype (float32/float16/bfloat16): y = act(cat(xi, channels) @ W^T + b)
    #   image_bias [B, N] float32 or None: added per image instead of packed.bias (the image-pooling
    #   branch's share of the projection plus the projection's bias)
    #   y [B, H, W, N] contiguous, x.dtype
    y_ref = pointwise_reference(inputs, weight, bias, image_bias=None, relu=True)   # plain PyTorch, x.dtype

Inference only: asking for a gradient through the op raises.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.library import triton_op

from fastmvit.kernels import aspp as _k
from fastmvit.kernels._common import empty_output, poisoning

from ._common import check_nhwc, inference_only
from .gemm import PackedLinear

__all__ = ["pointwise", "pointwise_plan", "pointwise_reference"]

MAX_INPUTS = 4


def _check(xs: Sequence[Tensor], packed: PackedLinear, image_bias: Optional[Tensor]):
    if not 1 <= len(xs) <= MAX_INPUTS:
        raise ValueError(f"pointwise: takes 1 to {MAX_INPUTS} inputs, got {len(xs)}")
    x = xs[0]
    check_nhwc("pointwise", x)
    for i, xi in enumerate(xs[1:], 1):
        check_nhwc(f"pointwise input {i}", xi)
        if xi.shape != x.shape or xi.dtype != x.dtype or xi.device != x.device:
            raise ValueError(f"pointwise: every input must match the first's shape, dtype and device; got "
                             f"{list(x.shape)} {x.dtype} and {list(xi.shape)} {xi.dtype}")
    B, K = x.shape[0], x.shape[-1]
    if packed.in_features != len(xs) * K or packed.dtype != x.dtype or packed.device != x.device:
        raise ValueError(f"pointwise: weights packed for {packed.in_features} {packed.dtype} input channels on "
                         f"{packed.device}, got {len(xs)} x {K} {x.dtype} on {x.device}")
    if image_bias is not None:
        if image_bias.shape != (B, packed.out_features) or image_bias.dtype != torch.float32:
            raise ValueError(f"pointwise: image_bias must be float32 [{B}, {packed.out_features}], got "
                             f"{image_bias.dtype} {list(image_bias.shape)}")
    elif packed.bias is None:
        raise ValueError("pointwise: needs a bias (packed.bias or image_bias)")


class PointwisePlan:
    """``pointwise`` resolved for one signature: ``plan(*inputs, packed=, image_bias=)`` allocates y and
    launches."""

    __slots__ = ("launch", "y_shape", "dtype", "device", "poison", "copy")

    def __init__(self, launch, y_shape, dtype, device, poison, copy):
        self.launch, self.y_shape, self.dtype, self.device, self.poison = launch, y_shape, dtype, device, poison
        self.copy = copy

    def __call__(self, *xs, packed: PackedLinear, image_bias: Optional[Tensor] = None, traced: bool = False, **_):
        if self.copy:
            xs = [x.contiguous() for x in xs]
        y = empty_output(self.y_shape, self.dtype, self.device, self.poison)
        if self.launch is not None:
            K = xs[0].shape[-1]
            rows = [x.reshape(-1, K) for x in xs]
            rows += [rows[0]] * (MAX_INPUTS - len(rows))
            bias = image_bias if image_bias is not None else packed.bias
            (self.launch.traced if traced else self.launch)(*rows, packed.weight, bias, y.view(-1, y.shape[-1]))
        return y


def _plan(xs, packed, image_bias, relu) -> PointwisePlan:
    _check(xs, packed, image_bias)
    copy = any(not x.is_contiguous() for x in xs)
    B, H, W, K = xs[0].shape
    y_shape = (B, H, W, packed.out_features)
    launch = None
    if B * H * W:
        launch = _k.pointwise_plan(xs[0].reshape(-1, K) if not copy else xs[0].contiguous().view(-1, K), len(xs),
                                   packed.weight, packed.out_features, H * W, image_bias is not None, relu)
    return PointwisePlan(launch, y_shape, xs[0].dtype, xs[0].device, poisoning(), copy)


@triton_op("fastmvit::pointwise", mutates_args=())
def _pointwise_op(x0: Tensor, x1: Optional[Tensor], x2: Optional[Tensor], x3: Optional[Tensor], w: Tensor,
                  bias: Optional[Tensor], image_bias: Optional[Tensor], in_features: int, out_features: int,
                  relu: bool) -> Tensor:
    xs = [x for x in (x0, x1, x2, x3) if x is not None]
    packed = PackedLinear(w, bias, in_features, out_features, out_features)
    return _plan(xs, packed, image_bias, relu)(*xs, packed=packed, image_bias=image_bias, traced=True)


inference_only(_pointwise_op, "fastmvit::pointwise")


def pointwise(*xs: Tensor, packed: PackedLinear, image_bias: Optional[Tensor] = None, relu: bool = True) -> Tensor:
    """1x1 conv over the channel concatenation of ``xs`` (not materialised). See the module docstring."""
    xs = [x.contiguous() for x in xs]
    if not 1 <= len(xs) <= MAX_INPUTS:
        raise ValueError(f"pointwise: takes 1 to {MAX_INPUTS} inputs, got {len(xs)}")
    pad = [None] * (MAX_INPUTS - len(xs))
    return _pointwise_op(*xs, *pad, packed.weight, packed.bias, image_bias, packed.in_features,
                         packed.out_features, relu)


def pointwise_plan(*xs: Tensor, packed: PackedLinear, image_bias: Optional[Tensor] = None,
                   relu: bool = True) -> PointwisePlan:
    """``pointwise``'s checks and launch configuration, done once for tensors like these."""
    return _plan(list(xs), packed, image_bias, relu)


def pointwise_reference(xs: Sequence[Tensor], weight: Tensor, bias: Optional[Tensor] = None, *,
                        image_bias: Optional[Tensor] = None, relu: bool = True) -> Tensor:
    """Plain PyTorch in the inputs' dtype: the concatenation materialised, ``weight [N, n * K]``."""
    x = torch.cat(list(xs), dim=-1)
    y = F.linear(x, weight.reshape(weight.shape[0], -1).to(x.dtype), None)
    if image_bias is not None:
        y = y + image_bias.to(x.dtype)[:, None, None, :]
    elif bias is not None:
        y = y + bias.to(x.dtype)
    return F.relu(y) if relu else y
