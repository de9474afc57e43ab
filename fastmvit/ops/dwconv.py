"""``fastmvit::dwconv3x3``: depthwise 3x3 convolution + folded-BN bias + optional SiLU on NHWC tensors.

Public API (the engine's contract)::

    w, b = pack_dwconv3x3(weight, bias)       # weight [C, 1, 3, 3] and bias [C], BN folded, float32
    y = dwconv3x3(x, w, b, stride=1, dilation=1, act=True)
    #   x [B, H, W, C] float32/float16/bfloat16, channels contiguous (other strides free);
    #   y [B, OH, OW, C] contiguous, x.dtype, OH = (H - 1) // stride + 1 (padding = dilation)
    #   stride 1 or 2; dilation any integer >= 1 (a run-time kernel argument: no compile per dilation)
    y_ref = dwconv3x3_reference(x, w, b, stride=1, dilation=1, act=True)   # plain PyTorch, x.dtype

Inference only: asking for a gradient through the op raises.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch.library import triton_op

from fastmvit.kernels import dwconv as _k
from fastmvit.kernels._common import empty_output, poisoning

from ._common import check_nhwc, inference_only

__all__ = ["pack_dwconv3x3", "dwconv3x3", "dwconv3x3_plan", "dwconv3x3_reference"]


def _check_vec(name: str, t: torch.Tensor, shape: Tuple[int, ...]) -> None:
    if tuple(t.shape) != shape or t.dtype != torch.float32:
        raise ValueError(f"{name}: expected a float32 tensor of shape {list(shape)} (use the pack_* function), "
                         f"got {t.dtype} {list(t.shape)}")


def pack_dwconv3x3(weight: torch.Tensor, bias: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Folded float32 ``weight [C, 1, 3, 3]``, ``bias [C]`` -> ``(w [9, C], b [C])`` float32, contiguous.

    Tap-major so that one tap's weights are a contiguous channel vector; kept in float32 (9*C values,
    negligible traffic) so half-precision activations lose nothing to weight rounding."""
    if weight.dim() != 4 or weight.shape[1:] != (1, 3, 3):
        raise ValueError(f"pack_dwconv3x3: expected a depthwise weight [C, 1, 3, 3], got {list(weight.shape)}")
    C = weight.shape[0]
    if bias.shape != (C,):
        raise ValueError(f"pack_dwconv3x3: bias must be [{C}], got {list(bias.shape)}")
    w = weight.detach().float().reshape(C, 9).t().contiguous()
    return w, bias.detach().float().contiguous()


def _check_geometry(stride, dilation) -> None:
    if stride not in (1, 2) or isinstance(dilation, (bool, float)) or dilation < 1:
        raise ValueError(f"dwconv3x3: bad stride and dilation (stride must be 1 or 2, dilation an integer >= 1), "
                         f"got stride={stride}, dilation={dilation!r}")


def _check(x, w, bias, stride, dilation):
    check_nhwc("dwconv3x3", x)
    C = x.shape[-1]
    _check_vec("dwconv3x3 weight", w, (9, C))
    _check_vec("dwconv3x3 bias", bias, (C,))
    _check_geometry(stride, dilation)
    if x.stride(-1) != 1:
        raise ValueError("dwconv3x3: the channel dim must be contiguous (stride 1)")
    if not (x.device == w.device == bias.device):
        raise ValueError(f"dwconv3x3: x, w and bias must share a device, got {x.device}, {w.device}, {bias.device}")


class DwconvPlan:
    """``dwconv3x3`` resolved for one signature: ``plan(x, w, bias)`` allocates y and launches."""

    __slots__ = ("launch", "y_shape", "dtype", "device", "poison", "copy")

    def __init__(self, launch, y_shape, dtype, device, poison, copy=False):
        self.launch, self.y_shape, self.dtype, self.device, self.poison = launch, y_shape, dtype, device, poison
        self.copy = copy

    def __call__(self, x, w, bias, *, traced: bool = False, **_):
        if self.copy:
            x = x.contiguous()
        y = empty_output(self.y_shape, self.dtype, self.device, self.poison, traced)
        if self.launch is not None:
            (self.launch.traced if traced else self.launch)(x, w, bias, y)
        return y


def _plan(x, w, bias, stride, dilation, act) -> DwconvPlan:
    _check(x, w, bias, stride, dilation)
    B, H, W, C = x.shape
    y_shape = (B, _k.out_size(H, stride), _k.out_size(W, stride), C)
    empty = B * y_shape[1] * y_shape[2] * C == 0
    return DwconvPlan(None if empty else _k.dwconv3x3_plan(x, y_shape, stride, dilation, act), y_shape, x.dtype,
                      x.device, poisoning())


@triton_op("fastmvit::dwconv3x3", mutates_args=())
def _dwconv3x3_op(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor, *, stride: int, dilation: int,
                  act: bool) -> torch.Tensor:
    return _plan(x, w, bias, stride, dilation, act)(x, w, bias, traced=True)


inference_only(_dwconv3x3_op, "fastmvit::dwconv3x3")


def dwconv3x3(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor, *, stride: int = 1, dilation: int = 1,
              act: bool = True) -> torch.Tensor:
    """Depthwise 3x3, padding = dilation, + bias, then SiLU if ``act``. See the module docstring."""
    _check_geometry(stride, dilation)  # before the op's schema turns a bad type into a less clear error
    if x.stride(-1) != 1:  # the one layout the kernel cannot index in place
        x = x.contiguous()
    return _dwconv3x3_op(x, w, bias, stride=stride, dilation=dilation, act=act)


def dwconv3x3_plan(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor, *, stride: int = 1, dilation: int = 1,
                   act: bool = True) -> DwconvPlan:
    """``dwconv3x3``'s checks and launch configuration, done once for tensors like these; the plan, called
    with the same arguments, launches without the op dispatch."""
    copy = x.stride(-1) != 1
    plan = _plan(x.contiguous() if copy else x, w, bias, stride, dilation, act)
    plan.copy = copy
    return plan


def dwconv3x3_reference(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor, *, stride: int = 1,
                        dilation: int = 1, act: bool = True) -> torch.Tensor:
    """Plain PyTorch, computed in ``x.dtype`` (weights cast to it, as a torch model in that dtype has them)."""
    C = x.shape[-1]
    weight = w.t().reshape(C, 1, 3, 3).to(x.dtype)
    y = F.conv2d(x.permute(0, 3, 1, 2), weight, bias.to(x.dtype), stride=stride, padding=dilation,
                 dilation=dilation, groups=C)
    if act:
        y = F.silu(y)
    return y.permute(0, 2, 3, 1).contiguous()
