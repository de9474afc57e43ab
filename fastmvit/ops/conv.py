"""``fastmvit::conv3x3``: dense 3x3 convolution (padding = dilation) + folded-BN bias + optional SiLU or ReLU,
NHWC out.

Public API (the engine's contract)::

    w, b = pack_conv3x3(weight, bias, dtype)  # weight [Cout, Cin, 3, 3], bias [Cout], BN folded, float32
                                              # -> w [9 * Cin, Cout] in dtype (row = tap * Cin + channel),
                                              #    b [Cout] float32
    y = conv3x3(x, w, b, stride=1, act=True)                      # x [B, H, W, Cin] NHWC
    y = conv3x3(images, w, b, stride=2, act=True, input_nchw=True)  # stem: x [B, 3, H, W] NCHW, in place
    y = conv3x3(x, w, b, stride=1, act=True, x2=x2)               # v1 fusion conv on cat([x, x2], channels)
    y = conv3x3(x, w, b, stride=1, act="relu", dilation=12)       # an ASPP branch: padding = dilation
    #   act: True / "silu", False / "none", or "relu"
    #   x2 [B, H, W, C2]; w packed from the [Cout, C1 + C2, 3, 3] weight, x's channels first
    #   y [B, OH, OW, Cout] contiguous, x.dtype; OH = (H - 1) // stride + 1
    y_ref = conv3x3_reference(x, w, b, stride=..., act=..., x2=None, input_nchw=False)

x, x2 and w share one dtype (float32, float16, bfloat16); float32 runs exact (non-TF32) dots.
Inference only: asking for a gradient through the op raises.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch.library import triton_op

from fastmvit.kernels import conv as _k
from fastmvit.kernels.dwconv import out_size

from fastmvit.kernels._common import empty_output, poisoning

from ._common import check_nhwc, inference_only

__all__ = ["pack_conv3x3", "conv3x3", "conv3x3_plan", "conv3x3_reference"]


def pack_conv3x3(weight: torch.Tensor, bias: torch.Tensor, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """Folded float32 ``weight [Cout, Cin, 3, 3]`` and ``bias [Cout]`` -> ``(w [9 * Cin, Cout] dtype,
    b [Cout] float32)``: K-major rows (tap-major, then input channel) with Cout contiguous, the B operand
    of the implicit GEMM. For the fusion conv pass the whole ``[Cout, 2C, 3, 3]`` weight."""
    if weight.dim() != 4 or weight.shape[2:] != (3, 3):
        raise ValueError(f"pack_conv3x3: expected a weight [Cout, Cin, 3, 3], got {list(weight.shape)}")
    cout, cin = weight.shape[:2]
    if bias.shape != (cout,):
        raise ValueError(f"pack_conv3x3: bias must be [{cout}], got {list(bias.shape)}")
    w = weight.detach().permute(2, 3, 1, 0).reshape(9 * cin, cout).to(dtype).contiguous()
    return w, bias.detach().float().contiguous()


def _logical(x: torch.Tensor, input_nchw: bool) -> Tuple[int, int, int, int, Tuple[int, int, int, int]]:
    """(B, H, W, C, strides in (b, h, w, c) order) of x in either layout."""
    if input_nchw:
        B, C, H, W = x.shape
        s = x.stride()
        return B, H, W, C, (s[0], s[2], s[3], s[1])
    B, H, W, C = x.shape
    return B, H, W, C, tuple(x.stride())


def _check_dilation(dilation) -> None:
    if not isinstance(dilation, int) or isinstance(dilation, bool) or dilation < 1:
        raise ValueError(f"conv3x3: dilation must be a positive int, got {dilation!r}")


def _check(x, w, bias, stride, x2, input_nchw, dilation=1):
    check_nhwc("conv3x3", x)
    B, H, W, c1, _ = _logical(x, input_nchw)
    c2 = 0
    if x2 is not None:
        check_nhwc("conv3x3 x2", x2)
        if input_nchw:
            raise ValueError("conv3x3: x2 (the fusion conv's second input) needs NHWC x, not input_nchw")
        if x2.shape[:3] != (B, H, W) or x2.dtype != x.dtype or x2.device != x.device:
            raise ValueError(f"conv3x3: x2 must match x's batch, map size, dtype and device; got x "
                             f"{list(x.shape)} {x.dtype}, x2 {list(x2.shape)} {x2.dtype}")
        c2 = x2.shape[-1]
    if w.dim() != 2 or w.shape[0] != 9 * (c1 + c2) or w.dtype != x.dtype:
        raise ValueError(f"conv3x3: expected w [9 * {c1 + c2}, Cout] in {x.dtype} (use pack_conv3x3), "
                         f"got {w.dtype} {list(w.shape)}")
    if bias.shape != (w.shape[1],) or bias.dtype != torch.float32:
        raise ValueError(f"conv3x3: expected a float32 bias [{w.shape[1]}], got {bias.dtype} {list(bias.shape)}")
    if stride not in (1, 2):
        raise ValueError(f"conv3x3: stride must be 1 or 2, got {stride}")
    _check_dilation(dilation)
    if not (x.device == w.device == bias.device):
        raise ValueError(f"conv3x3: x, w and bias must share a device, got {x.device}, {w.device}, {bias.device}")


def _plan(x, w, bias, x2, stride, act, input_nchw, dilation=1) -> "ConvPlan":
    _check(x, w, bias, stride, x2, input_nchw, dilation)
    B, H, W, c1, strides = _logical(x, input_nchw)
    y_shape = (B, out_size(H, stride), out_size(W, stride), w.shape[1])
    empty = B * y_shape[1] * y_shape[2] * y_shape[3] == 0
    launch = None if empty else _k.conv3x3_plan(x, strides, H, W, c1, x2, y_shape, stride, act, dilation=dilation)
    return ConvPlan(launch, y_shape, x.dtype, x.device, poisoning())


class ConvPlan:
    """``conv3x3`` resolved for one signature: ``plan(x, w, bias, x2=...)`` allocates y and launches
    (``traced`` through wrap_triton, for the registered op)."""

    __slots__ = ("launch", "y_shape", "dtype", "device", "poison", "prepare")

    def __init__(self, launch, y_shape, dtype, device, poison):
        self.launch, self.y_shape, self.dtype, self.device, self.poison = launch, y_shape, dtype, device, poison
        self.prepare = None  # set by conv3x3_plan when the inputs need a layout change first

    def __call__(self, x, w, bias, *, x2=None, traced: bool = False, **_):
        if self.prepare is not None:
            x, x2, _nchw = _prepare(x, x2, self.prepare)
        y = empty_output(self.y_shape, self.dtype, self.device, self.poison, traced)
        if self.launch is not None:
            (self.launch.traced if traced else self.launch)(x, x if x2 is None else x2, w, bias, y)
        return y


@triton_op("fastmvit::conv3x3", mutates_args=())
def _conv3x3_op(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor, x2: Optional[torch.Tensor], *,
                stride: int, act: str, input_nchw: bool, dilation: int = 1) -> torch.Tensor:
    return _plan(x, w, bias, x2, stride, act, input_nchw, dilation)(x, w, bias, x2=x2, traced=True)


inference_only(_conv3x3_op, "fastmvit::conv3x3")


def _prepare(x, x2, input_nchw: bool):
    """The layouts the kernel reads in place: only tiny-Cin convs gather over arbitrary strides (a wide
    NCHW input is made NHWC once); channels contiguous otherwise."""
    c_stride = x.stride(1) if input_nchw else x.stride(-1)
    wide = (x.shape[1] if input_nchw else x.shape[-1]) > _k.FLAT_K_MAX_CIN
    if input_nchw and wide:
        x, input_nchw = x.permute(0, 2, 3, 1).contiguous(), False
    elif wide and c_stride != 1:
        x = x.contiguous()
    if x2 is not None and x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return x, x2, input_nchw


def conv3x3(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor, *, stride: int, act,
            x2: Optional[torch.Tensor] = None, input_nchw: bool = False, dilation: int = 1) -> torch.Tensor:
    """Dense 3x3, padding = dilation, + bias, then the activation ``act``. See the module docstring."""
    _check_dilation(dilation)
    x, x2, input_nchw = _prepare(x, x2, input_nchw)
    return _conv3x3_op(x, w, bias, x2, stride=stride, act=_k.act_name(act), input_nchw=input_nchw,
                       dilation=dilation)


def conv3x3_plan(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor, *, stride: int, act,
                 x2: Optional[torch.Tensor] = None, input_nchw: bool = False, dilation: int = 1) -> ConvPlan:
    """``conv3x3``'s checks and launch configuration, done once for tensors with these shapes, strides,
    dtypes and devices: the plan, called with the same arguments, launches without the op dispatch."""
    xp, x2p, nchw = _prepare(x, x2, input_nchw)
    plan = _plan(xp, w, bias, x2p, stride, act, nchw, dilation)
    if xp is not x or x2p is not x2:
        plan.prepare = input_nchw
    return plan


def conv3x3_reference(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor, *, stride: int, act,
                      x2: Optional[torch.Tensor] = None, input_nchw: bool = False, dilation: int = 1) -> torch.Tensor:
    """Plain PyTorch, computed in ``x.dtype`` (weights cast to it); the concatenation is materialised."""
    xn = x if input_nchw else x.permute(0, 3, 1, 2)
    if x2 is not None:
        xn = torch.cat([xn, x2.permute(0, 3, 1, 2)], dim=1)
    cin, cout = xn.shape[1], w.shape[1]
    weight = w.reshape(3, 3, cin, cout).permute(3, 2, 0, 1).to(x.dtype)
    y = F.conv2d(xn, weight, bias.to(x.dtype), stride=stride, padding=dilation, dilation=dilation)
    act = _k.act_name(act)
    if act == "silu":
        y = F.silu(y)
    elif act == "relu":
        y = F.relu(y)
    return y.permute(0, 2, 3, 1).contiguous()
