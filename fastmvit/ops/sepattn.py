"""MobileViTv2 separable-attention context (the part of ``SeparableAttention`` before out_proj): the
registered op, the public call, its reference, and the packing of qkv_proj in the layout they prefer.
out_proj itself is ``fastmvit.ops.gemm.linear`` with ``relu_scale=cv``.

The checkpoints order qkv_proj's 1 + 2d outputs q | k | v; a [M, 1 + 2d] buffer leaves every row and
the v slice misaligned, so Triton reads them element by element. ``pack_qkv`` reorders the outputs to
k | v | q and pads rows to a multiple of 16: k, v and the rows are then 16-byte aligned (for d a multiple
of 16, as in every released v2):

    qkv_w = pack_qkv(attn.qkv_proj.weight, attn.qkv_proj.bias, norm_weight=gn1.weight, norm_bias=gn1.bias,
                     dtype=dt, device=dev)
    qkv = linear(x, qkv_w, norm="group", group_stats=s, rows_per_sample=H * W)   # [M, 2d + 1] view
    cv = sepattn_context(qkv, d, H, W, **qkv_columns(d))                         # q_col=2d, k_col=0
    x, s = linear(qkv[:, d:2 * d], out_w, relu_scale=cv, hw=(H, W), residual=x, ...)
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.library import triton_op

from ..kernels import sepattn as _k
from ._common import inference_only
from .gemm import PackedLinear, pack_linear

__all__ = ["sepattn_context", "sepattn_context_plan", "sepattn_context_reference", "pack_qkv", "qkv_columns"]


def qkv_columns(d: int) -> dict:
    """Columns of q and k in the output of a ``pack_qkv`` GEMM (v is columns d .. 2d-1)."""
    return {"q_col": 2 * d, "k_col": 0}


def pack_qkv(weight: Tensor, bias: Optional[Tensor] = None, *, norm_weight: Optional[Tensor] = None,
             norm_bias: Optional[Tensor] = None, dtype: torch.dtype = torch.float32, device=None) -> PackedLinear:
    """``pack_linear`` for qkv_proj ([1 + 2d, d] or [1 + 2d, d, 1, 1], outputs q | k | v) with the outputs
    reordered to k | v | q and y's rows padded to a multiple of 16 (see the module docstring)."""
    d = (weight.shape[0] - 1) // 2
    if weight.shape[0] != 1 + 2 * d or weight.flatten(1).shape[1] != d:
        raise ValueError(f"qkv_proj weight must be [1 + 2d, d], got {tuple(weight.shape)}")
    order = torch.cat([torch.arange(1, 1 + 2 * d), torch.zeros(1, dtype=torch.long)]).to(weight.device)
    return pack_linear(weight[order], None if bias is None else bias[order], norm_weight=norm_weight,
                       norm_bias=norm_bias, dtype=dtype, device=device, pad_output=True)


@triton_op("fastmvit::sepattn_context", mutates_args={})
def _context_op(qkv: Tensor, d: int, height: int, width: int, q_col: int, k_col: int) -> Tensor:
    return _k.context(qkv, d, height, width, q_col, k_col)


inference_only(_context_op, "fastmvit::sepattn_context")


def _as_rows(qkv: Tensor, H: Optional[int], W: Optional[int]):
    if qkv.dim() == 4:
        B, h, w, C = qkv.shape
        if (H, W) not in ((None, None), (h, w)):
            raise ValueError(f"H, W = {(H, W)} disagree with the 4-D qkv's map {(h, w)}")
        H, W = h, w
        # merge (B, H, W) into rows without copying when the map is row-contiguous
        if qkv.stride(1) == W * qkv.stride(2) and qkv.stride(0) == H * qkv.stride(1):
            qkv = qkv.as_strided((B * H * W, C), (qkv.stride(2), qkv.stride(3)))
        else:
            qkv = qkv.reshape(B * H * W, C)
    if qkv.dim() != 2 or H is None or W is None:
        raise ValueError("qkv must be [B*H*W, C] with H and W given, or [B, H, W, C]")
    return (qkv if qkv.stride(1) == 1 else qkv.contiguous()), int(H), int(W)


def _resolve(qkv, d, H, W, q_col, k_col):
    qkv, H, W = _as_rows(qkv, H, W)
    M, C = qkv.shape
    if H % 2 or W % 2 or H <= 0 or W <= 0 or M % (H * W):
        raise ValueError(f"H, W must be even and H*W must divide the {M} rows, got {(H, W)}")
    if not (0 <= q_col < C and 0 <= k_col and k_col + d <= C and d > 0):
        raise ValueError(f"q_col={q_col}, k_col={k_col}, d={d} do not fit in {C} channels")
    return qkv, int(d), H, W, int(q_col), int(k_col)


def sepattn_context(qkv: Tensor, d: int, H: Optional[int] = None, W: Optional[int] = None, *,
                    q_col: int = 0, k_col: int = 1) -> Tensor:
    """Context vectors of MobileViTv2's separable attention.

    qkv: [B*H*W, C] (rows in NHWC order, column stride 1, any row stride) or [B, H, W, C]; float32,
         float16 or bfloat16. The query is channel q_col, the keys channels k_col .. k_col+d-1 (the
         checkpoints' order is q | k | v: q_col=0, k_col=1).
    H, W: the map, both even (required with 2-D qkv).
    Returns cv [B, 4, d] float32: cv[b, i*2+j] = sum_n softmax(q)_n * k_n over the N = H*W/4 pixels
    (2r+i, 2c+j) of sample b, fp32 softmax with max subtraction.
    """
    return torch.ops.fastmvit.sepattn_context(*_resolve(qkv, d, H, W, q_col, k_col))


class ContextPlan:
    """``sepattn_context`` resolved once for one signature: called with the same arguments, it launches
    without the op dispatch."""

    __slots__ = ("plan", "H", "W", "as_rows")

    def __init__(self, plan, H, W, as_rows: bool):
        self.plan, self.H, self.W = plan, H, W
        self.as_rows = as_rows  # qkv is not yet the kernel's [rows, C] with unit column stride (decided once)

    def __call__(self, qkv: Tensor, d: int, H: Optional[int] = None, W: Optional[int] = None, **_) -> Tensor:
        if self.as_rows:
            qkv = _as_rows(qkv, self.H, self.W)[0]
        return self.plan(qkv)


def sepattn_context_plan(qkv: Tensor, d: int, H: Optional[int] = None, W: Optional[int] = None, *,
                         q_col: int = 0, k_col: int = 1) -> ContextPlan:
    """The checks and launch configuration of ``sepattn_context`` for a qkv like this one, done once."""
    rows, d, H, W, q_col, k_col = _resolve(qkv, d, H, W, q_col, k_col)
    return ContextPlan(_k.context_plan(rows, d, H, W, q_col, k_col), H, W, rows is not qkv)


def sepattn_context_reference(qkv: Tensor, d: int, H: int, W: int, *, q_col: int = 0, k_col: int = 1) -> Tensor:
    """The same, as ``fastmvit.model.blocks.SeparableAttention`` computes it on the [B, d, 4, N] layout, in
    qkv's dtype; returns [B, 4, d] float32."""
    x = qkv.reshape(-1, H // 2, 2, W // 2, 2, qkv.shape[-1])          # [B, r, i, c, j, C]
    x = x.permute(0, 5, 2, 4, 1, 3).reshape(x.shape[0], -1, 4, (H // 2) * (W // 2))  # [B, C, 4, N]
    q, k = x[:, q_col:q_col + 1], x[:, k_col:k_col + d]
    cv = (k * torch.softmax(q, dim=-1)).sum(dim=-1)                  # [B, d, 4]
    return cv.transpose(1, 2).float()
