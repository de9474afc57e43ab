"""``fastmvit::bilinear_argmax``: segmentation label maps, the logits' bilinear upsampling fused with the argmax.

Public API::

    labels = bilinear_argmax(logits, size=(H, W), align_corners=False)
    #   logits [B, NC, h, w] (any strides; float32/float16/bfloat16) -> labels [B, H, W] int64 (ties: lowest class)
    ref = bilinear_argmax_reference(logits, size, align_corners)   # F.interpolate in float32 + argmax

Exactly ``fastmvit.masks.label_map``'s arithmetic (PyTorch's bilinear in float32), without the upsampled
logits ever being stored.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.library import triton_op

from fastmvit.kernels import labels as _k
from fastmvit.kernels._common import empty_output, poisoning

from ._common import ACTIVATION_DTYPES

__all__ = ["bilinear_argmax", "bilinear_argmax_plan", "bilinear_argmax_reference"]


def _check(logits: Tensor, size) -> Tuple[int, int]:
    if logits.dim() != 4:
        raise ValueError(f"bilinear_argmax: expected logits [B, NC, h, w], got shape {list(logits.shape)}")
    if logits.dtype not in ACTIVATION_DTYPES:
        raise TypeError(f"bilinear_argmax: logits must be float32, float16 or bfloat16, got {logits.dtype}")
    if len(size) != 2 or not all(isinstance(s, int) and s >= 1 for s in size):
        raise ValueError(f"bilinear_argmax: size must be two positive ints (H, W), got {size!r}")
    if logits.shape[1] < 1:
        raise ValueError("bilinear_argmax: logits have no classes")
    return tuple(size)


class LabelsPlan:
    __slots__ = ("launch", "shape", "device", "poison")

    def __init__(self, launch, shape, device, poison):
        self.launch, self.shape, self.device, self.poison = launch, shape, device, poison

    def __call__(self, logits, *, traced: bool = False, **_):
        y = empty_output(self.shape, torch.int64, self.device, False)
        if self.poison:
            y.fill_(-1)  # no NaN in int64: -1 is no class
        if self.launch is not None:
            (self.launch.traced if traced else self.launch)(logits, y)
        return y


def _plan(logits, size, align_corners) -> LabelsPlan:
    H, W = _check(logits, size)
    shape = (logits.shape[0], H, W)
    launch = _k.labels_plan(logits, logits.stride(), shape, align_corners) if logits.numel() else None
    return LabelsPlan(launch, shape, logits.device, poisoning())


@triton_op("fastmvit::bilinear_argmax", mutates_args=())
def _labels_op(logits: Tensor, height: int, width: int, align_corners: bool) -> Tensor:
    return _plan(logits, (height, width), align_corners)(logits, traced=True)


def bilinear_argmax(logits: Tensor, size: Tuple[int, int], align_corners: bool = False) -> Tensor:
    """Class index per pixel of ``logits`` bilinearly resized to ``size``. See the module docstring."""
    H, W = _check(logits, size)
    return _labels_op(logits, H, W, bool(align_corners))


def bilinear_argmax_plan(logits: Tensor, size: Tuple[int, int], align_corners: bool = False) -> LabelsPlan:
    return _plan(logits, tuple(size), bool(align_corners))


def bilinear_argmax_reference(logits: Tensor, size: Tuple[int, int], align_corners: bool = False) -> Tensor:
    """``fastmvit.masks.label_map``: F.interpolate on float32 logits (skipped at the same size), argmax."""
    x = logits.float()
    if tuple(size) != tuple(x.shape[-2:]):
        x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=align_corners)
    return x.argmax(dim=1)
