"""Segmentation label maps: bilinear upsampling of the logits fused with the argmax over classes.

``labels[b, oh, ow] = argmax_c bilinear(logits[b, c])[oh, ow]``, the upsampled logits never stored. The
arithmetic is PyTorch's ``upsample_bilinear2d`` (``F.interpolate(mode="bilinear")`` with an output size):
the scale is ``in / out`` (``align_corners=False``) or ``(in - 1) / (out - 1)`` (True), rounded to float32;
the source coordinate ``scale * (dst + 0.5) - 0.5`` clamped at 0 (or ``scale * dst``), its integer part
and fraction, and ``h0 * (w0 * x00 + w1 * x01) + h1 * (w0 * x10 + w1 * x11)`` in float32. Ties go to the
lowest class, as ``torch.argmax``. One program per block of output pixels loops over the classes
(21 for PASCAL VOC), reading the four neighbours of each: the logits are small and L2-resident.
"""
from __future__ import annotations

from typing import List

import numpy as np
import torch
import triton
import triton.language as tl

from ._common import TRITON_DTYPE, CompileConfig, Launch, interpreting


@triton.jit
def _bilinear_argmax_kernel(
    x_ptr, y_ptr,
    NC, IH, IW, OH, OW, M,
    sxb, sxc, sxh, sxw,                      # logits strides in elements, logical (b, c, h, w) order
    scale_h, scale_w,                        # float32, as PyTorch computes them
    ALIGN: tl.constexpr, BLOCK_P: tl.constexpr,
):
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = p < M
    ow = p % OW
    oh = (p // OW) % OH
    b = (p // (OW * OH)).to(tl.int64)
    if ALIGN:
        hr = scale_h * oh.to(tl.float32)
        wr = scale_w * ow.to(tl.float32)
    else:
        hr = tl.maximum(scale_h * (oh.to(tl.float32) + 0.5) - 0.5, 0.0)
        wr = tl.maximum(scale_w * (ow.to(tl.float32) + 0.5) - 0.5, 0.0)
    h0 = hr.to(tl.int32)  # truncation: hr >= 0
    w0 = wr.to(tl.int32)
    h1 = h0 + (h0 < IH - 1).to(tl.int32)
    w1 = w0 + (w0 < IW - 1).to(tl.int32)
    hl1 = hr - h0.to(tl.float32)
    wl1 = wr - w0.to(tl.float32)
    hl0 = 1.0 - hl1
    wl0 = 1.0 - wl1
    base = x_ptr + b * sxb
    o00 = h0.to(tl.int64) * sxh + w0.to(tl.int64) * sxw
    o01 = h0.to(tl.int64) * sxh + w1.to(tl.int64) * sxw
    o10 = h1.to(tl.int64) * sxh + w0.to(tl.int64) * sxw
    o11 = h1.to(tl.int64) * sxh + w1.to(tl.int64) * sxw
    best = tl.full([BLOCK_P], float("-inf"), tl.float32)
    label = tl.zeros([BLOCK_P], dtype=tl.int64)
    for c in range(0, NC):
        xc = base + c * sxc
        x00 = tl.load(xc + o00, mask=p_ok, other=0.0).to(tl.float32)
        x01 = tl.load(xc + o01, mask=p_ok, other=0.0).to(tl.float32)
        x10 = tl.load(xc + o10, mask=p_ok, other=0.0).to(tl.float32)
        x11 = tl.load(xc + o11, mask=p_ok, other=0.0).to(tl.float32)
        v = hl0 * (wl0 * x00 + wl1 * x01) + hl1 * (wl0 * x10 + wl1 * x11)
        better = v > best  # strict: a tie keeps the lower class
        best = tl.where(better, v, best)
        label = tl.where(better, c, label)
    tl.store(y_ptr + p.to(tl.int64), label, mask=p_ok)


def source_scale(n_in: int, n_out: int, align_corners: bool) -> float:
    """PyTorch's ``area_pixel_compute_scale`` for an output size (no scale factor), in float32."""
    if align_corners:
        return float(np.float32((n_in - 1) / (n_out - 1))) if n_out > 1 else 0.0
    return float(np.float32(n_in / n_out))


def labels_config(M: int, interpret=None) -> int:
    """BLOCK_P: 512 pixels (4 per thread), or one block of all of them under the interpreter."""
    if interpreting() if interpret is None else interpret:
        return min(4096, max(16, triton.next_power_of_2(M)))
    return 512


def labels_plan(x: torch.Tensor, strides, out_shape, align_corners: bool) -> Launch:
    """The launch for logits like ``x`` (``[B, NC, IH, IW]`` with logical ``strides``): ``plan(x, y)`` writes
    ``y [B, OH, OW]`` int64."""
    B, NC, IH, IW = x.shape
    _, OH, OW = out_shape
    M = B * OH * OW
    block = labels_config(M)
    return Launch(_bilinear_argmax_kernel, (triton.cdiv(M, block),),
                  (NC, IH, IW, OH, OW, M, *strides, source_scale(IH, OH, align_corners),
                   source_scale(IW, OW, align_corners)),
                  ALIGN=align_corners, BLOCK_P=block, num_warps=4)


def compile_configs() -> List[CompileConfig]:
    """One per (logits dtype, align_corners): the size and class count are run-time values."""
    configs = []
    for dtype, name in TRITON_DTYPE.items():
        for align in (False, True):
            sig = {"x_ptr": f"*{name}", "y_ptr": "*i64"}
            sig.update({a: "i32" for a in ("NC", "IH", "IW", "OH", "OW", "M", "sxb", "sxc", "sxh", "sxw")})
            sig.update({"scale_h": "fp32", "scale_w": "fp32", "ALIGN": "constexpr", "BLOCK_P": "constexpr"})
            configs.append(CompileConfig(name=f"bilinear_argmax-align{int(align)}-{name}", fn=_bilinear_argmax_kernel,
                                         signature=sig, constexprs={"ALIGN": align, "BLOCK_P": labels_config(1, False)},
                                         num_warps=4))
    return configs
