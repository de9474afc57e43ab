"""Global mean pooling + classifier: the registered op, the public calls and their reference.

The classifier's weights are packed like any GEMM's (``fastmvit.ops.gemm.pack_linear``)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.library import triton_op

from ..kernels import pool as _k
from ._common import inference_only
from .gemm import PackedLinear

__all__ = ["pool_linear", "pool_linear_plan", "classifier", "classifier_plan", "pool_linear_reference"]


@triton_op("fastmvit::pool_linear", mutates_args={})
def _pool_linear_op(x: Tensor, w: Tensor, n_classes: int, bias: Optional[Tensor], relu: bool = False) -> Tensor:
    return _k.pool_linear(x, w, n_classes, bias, relu)


inference_only(_pool_linear_op, "fastmvit::pool_linear")


def _resolve(x3: Tensor, packed: PackedLinear) -> Tensor:
    if x3.shape[-1] != packed.in_features:
        raise ValueError(f"features have {x3.shape[-1]} channels, the classifier expects {packed.in_features}")
    if x3.device != packed.device:
        raise ValueError(f"features on {x3.device}, classifier weights on {packed.device}")
    return x3.contiguous() if x3.stride(2) != 1 else x3


def _run(x3: Tensor, packed: PackedLinear, relu: bool = False) -> Tensor:
    return torch.ops.fastmvit.pool_linear(_resolve(x3, packed), packed.weight, packed.out_features, packed.bias,
                                          relu)


def _pooled_rows(x: Tensor) -> Tensor:
    """x [B, H, W, C] as [B, H * W, C] without a copy where the strides allow."""
    if x.dim() != 4:
        raise ValueError(f"x must be [B, H, W, C], got {tuple(x.shape)}")
    B, H, W, C = x.shape
    if x.stride(1) != W * x.stride(2):  # H and W must merge into one row index without a copy
        x = x.contiguous()
    return x.as_strided((B, H * W, C), (x.stride(0), x.stride(2), x.stride(3)))


def pool_linear(x: Tensor, packed: PackedLinear, *, relu: bool = False) -> Tensor:
    """logits = mean over (H, W) of x, then @ W^T + b (then ReLU if ``relu``: DeepLabV3's image pooling).

    x: [B, H, W, C] NHWC (channel stride 1), float32 / float16 / bfloat16 (any; it is pooled in fp32
       and cast to the weights' dtype for the product, as PyTorch's pooled tensor would be).
    packed: ``pack_linear(fc.weight [NC, C], fc.bias)``.
    Returns [B, NC] float32 logits.
    """
    return _run(_pooled_rows(x), packed, relu)


class PoolLinearPlan:
    """``pool_linear`` resolved once for one x signature."""

    __slots__ = ("plan",)

    def __init__(self, plan):
        self.plan = plan

    def __call__(self, x: Tensor, packed: PackedLinear, **_) -> Tensor:
        return self.plan(_resolve(_pooled_rows(x), packed), packed.weight, packed.bias)


def pool_linear_plan(x: Tensor, packed: PackedLinear, *, relu: bool = False) -> PoolLinearPlan:
    """The checks and launch configuration of ``pool_linear`` for an x like this one, done once."""
    x3 = _resolve(_pooled_rows(x), packed)
    return PoolLinearPlan(_k.pool_linear_plan(x3, packed.weight, packed.out_features, packed.bias is not None, relu))


def classifier(features: Tensor, packed: PackedLinear) -> Tensor:
    """logits [B, NC] float32 = features [B, C] @ W^T + b, for features already pooled (for example the
    float32 output of ``linear(..., pool=True)``)."""
    if features.dim() != 2:
        raise ValueError(f"features must be [B, C], got {tuple(features.shape)}")
    return _run(features[:, None, :], packed)


class ClassifierPlan:
    """``classifier`` resolved once for one features signature: called with the same arguments, it
    launches without the op dispatch."""

    __slots__ = ("plan", "copy")

    def __init__(self, plan, copy: bool):
        self.plan, self.copy = plan, copy

    def __call__(self, features: Tensor, packed: PackedLinear) -> Tensor:
        x3 = features[:, None, :]
        return self.plan(x3.contiguous() if self.copy else x3, packed.weight, packed.bias)


def classifier_plan(features: Tensor, packed: PackedLinear) -> ClassifierPlan:
    """The checks and launch configuration of ``classifier`` for features like these, done once."""
    if features.dim() != 2:
        raise ValueError(f"features must be [B, C], got {tuple(features.shape)}")
    x3 = features[:, None, :]
    ready = _resolve(x3, packed)
    return ClassifierPlan(_k.pool_linear_plan(ready, packed.weight, packed.out_features, packed.bias is not None),
                          ready is not x3)


def pool_linear_reference(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *, relu: bool = False) -> Tensor:
    """x [B, H, W, C] -> mean over H, W -> F.linear in x's dtype (-> ReLU) -> float32 [B, NC]."""
    def cast(t):
        return None if t is None else t.to(dtype=x.dtype, device=x.device)

    y = F.linear(x.mean(dim=(1, 2)), cast(weight), cast(bias))
    return (F.relu(y) if relu else y).float()
