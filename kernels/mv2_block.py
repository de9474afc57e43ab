"""The whole MobileNetV2 inverted residual in one kernel; the expanded tensor never reaches GPU memory.

    y = W3 @ silu(dw3x3(silu(W1 @ x + b1)) + bdw) + b3  (+ x when stride 1 and Cin == Cout)

A program owns BLOCK_M output pixels and every output channel. It walks the hidden channels in chunks
of BLOCK_H; for each chunk and each of the 9 taps it recomputes the 1x1 expansion (+b1, SiLU) of the
input pixels under that tap with ``tl.dot`` (the halo: up to 9x the expansion FLOPs, 2.25x at stride
2), zeroes taps that fall in the padding (the depthwise pads the *expanded* map with zeros), accumulates
the depthwise in float32, applies bias + SiLU, rounds the chunk to the activation dtype (as the unfused
path stores it) and accumulates its share of the 1x1 projection with ``tl.dot``. Bias and residual
finish the tile. When the kernel is the better choice: ``fastmvit.ops.mv2_block.should_fuse``.

Packed operands (``fastmvit.ops.mv2_block.pack_inverted_residual``): w1 ``[Cin, HID]`` and w3
``[HID, Cout]`` in the activation dtype, wdw ``[9, HID]`` and the three biases float32.
"""
from __future__ import annotations

from typing import List, Tuple

import torch
import triton
import triton.language as tl

from ._common import TRITON_DTYPE, CompileConfig, Launch, interpreting, silu, vec_width, target_arch
from .dwconv import out_size

# Limits of the fused kernel: the whole input row (Cin) is one dot operand and the [BLOCK_M, Cout]
# accumulator lives in registers for the program's lifetime.
MAX_CIN = 128
MAX_COUT = 256


@triton.jit
def _inverted_residual_kernel(
    x_ptr, w1_ptr, b1_ptr, wdw_ptr, bdw_ptr, w3_ptr, b3_ptr, y_ptr,
    H, W, OH, OW, M, CIN, HID, COUT,
    sxb, sxh, sxw,                         # input strides in elements (channels contiguous)
    STRIDE: tl.constexpr, RESIDUAL: tl.constexpr, VEC: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_CO: tl.constexpr,
):
    # x: [B, H, W, CIN]; y: [B, OH, OW, COUT] contiguous
    if VEC > 1:  # the launcher checked these divide; writing it lets Triton prove 16-byte alignment
        CIN = (CIN // VEC) * VEC
        HID = (HID // VEC) * VEC
        COUT = (COUT // VEC) * VEC
        sxb = (sxb // VEC) * VEC
        sxh = (sxh // VEC) * VEC
        sxw = (sxw // VEC) * VEC
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = m < M
    ow = m % OW
    oh = (m // OW) % OH
    x_b = x_ptr + (m // (OW * OH)).to(tl.int64) * sxb
    ci = tl.arange(0, BLOCK_CI)
    ci_ok = ci < CIN
    co = tl.arange(0, BLOCK_CO)
    co_ok = co < COUT
    rh = tl.arange(0, BLOCK_H)
    acc = tl.zeros([BLOCK_M, BLOCK_CO], dtype=tl.float32)
    for h0 in range(0, HID, BLOCK_H):
        hh = h0 + rh
        h_ok = hh < HID
        w1 = tl.load(w1_ptr + ci[:, None] * HID + hh[None, :], mask=ci_ok[:, None] & h_ok[None, :], other=0.0)
        b1 = tl.load(b1_ptr + hh, mask=h_ok, other=0.0)
        dw = tl.zeros([BLOCK_M, BLOCK_H], dtype=tl.float32)
        for tap in range(9):  # not unrolled: 9 independent async wgmmas would hold 9 accumulators
            ih = oh * STRIDE - 1 + tap // 3
            iw = ow * STRIDE - 1 + tap % 3
            ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            xp = x_b + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw
            xt = tl.load(xp[:, None] + ci[None, :], mask=ok[:, None] & ci_ok[None, :], other=0.0)
            e = silu(tl.dot(xt, w1, input_precision=PREC) + b1[None, :])
            e = tl.where(ok[:, None], e, 0.0)  # the depthwise's zero padding is in the expanded map
            wd = tl.load(wdw_ptr + tap * HID + hh, mask=h_ok, other=0.0)
            dw += e * wd[None, :]
        hid = silu(dw + tl.load(bdw_ptr + hh, mask=h_ok, other=0.0)[None, :])
        w3 = tl.load(w3_ptr + hh[:, None] * COUT + co[None, :], mask=h_ok[:, None] & co_ok[None, :], other=0.0)
        acc = tl.dot(hid.to(w3.dtype), w3, acc, input_precision=PREC)
    acc += tl.load(b3_ptr + co, mask=co_ok, other=0.0)[None, :]
    out_ok = m_ok[:, None] & co_ok[None, :]
    if RESIDUAL:  # stride 1 and CIN == COUT: output pixel m is input pixel (b, oh, ow)
        xr = x_b + oh.to(tl.int64) * sxh + ow.to(tl.int64) * sxw
        acc += tl.load(xr[:, None] + co[None, :], mask=out_ok, other=0.0).to(tl.float32)
    y_off = m.to(tl.int64)[:, None] * COUT + co[None, :]
    tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=out_ok)


# --------------------------------------------------------------------------------------------------
# launch configuration
# --------------------------------------------------------------------------------------------------

def fused_config(cin: int, hidden: int, cout: int, dtype: torch.dtype, M: int = 1 << 30,
                 interpret: bool | None = None, arch: int = 90) -> Tuple[int, int, int, int, int, int]:
    """(BLOCK_M, BLOCK_CI, BLOCK_H, BLOCK_CO, num_warps, num_stages). BLOCK_M = 64 output pixels (one
    wgmma M per warpgroup); BLOCK_H = 32 hidden channels per chunk keeps the per-tap expansion tile
    and the depthwise accumulator at 16 registers each; Cout > 64 takes 8 warps so the [64, Cout]
    accumulator stays at or under 64 registers a thread (with 4 warps those blocks need ~235).
    float32 (exact FMA dots, operands in registers) takes 32 pixels, or 16 with 8 warps once
    Cout > 64 (8 warps cap the compiler at 128 registers; 32 pixels spilled at Cout 96). Below sm_90
    (``arch``) there is no warpgroup MMA to fill: a 16-bit block on 4 warps takes 32 pixels (24-48-24
    spilled at 64 under triton 3.6 with 128 registers; 32 pixels: 96)."""
    bci = max(16, triton.next_power_of_2(cin))
    bco = max(16, triton.next_power_of_2(cout))
    if interpreting() if interpret is None else interpret:
        bh = max(16, min(256, triton.next_power_of_2(hidden)))
        return min(512, max(16, triton.next_power_of_2(M))), bci, bh, bco, 4, 1
    if dtype == torch.float32:
        return (16, bci, 16, bco, 8, 1) if bco >= 128 else (32, bci, 16, bco, 4, 1)
    warps = 8 if bco >= 128 else 4
    return (64 if arch >= 90 or warps == 8 else 32), bci, 32, bco, warps, 1


def inverted_residual_plan(x: torch.Tensor, hidden: int, y_shape: Tuple[int, int, int, int], stride: int,
                           residual: bool) -> Launch:
    """The launch for an x like this one (metadata only): ``plan(x, w1, b1, wdw, bdw, w3, b3, y)`` writes
    a contiguous ``y [B, OH, OW, Cout]``."""
    B, H, W, cin = x.shape
    OH, OW, cout = y_shape[1], y_shape[2], y_shape[3]
    M = B * OH * OW
    bm, bci, bh, bco, warps, stages = fused_config(cin, hidden, cout, x.dtype, M, arch=target_arch(x.device))
    sxb, sxh, sxw = x.stride(0), x.stride(1), x.stride(2)
    vec = vec_width(x.dtype, cin, hidden, cout, sxb, sxh, sxw)
    return Launch(
        _inverted_residual_kernel, (triton.cdiv(M, bm),), (H, W, OH, OW, M, cin, hidden, cout, sxb, sxh, sxw),
        STRIDE=stride, RESIDUAL=residual, VEC=vec, PREC="ieee" if x.dtype == torch.float32 else "tf32",
        BLOCK_M=bm, BLOCK_CI=bci, BLOCK_H=bh, BLOCK_CO=bco, num_warps=warps, num_stages=stages)


def inverted_residual_launch(x: torch.Tensor, w1, b1, wdw, bdw, w3, b3, y: torch.Tensor, stride: int,
                             residual: bool) -> torch.Tensor:
    """Launch (traceably) into a preallocated contiguous ``y [B, OH, OW, Cout]``."""
    inverted_residual_plan(x, w1.shape[1], tuple(y.shape), stride, residual).traced(x, w1, b1, wdw, bdw, w3, b3, y)
    return y


# --------------------------------------------------------------------------------------------------
# every specialisation the engine launches
# --------------------------------------------------------------------------------------------------

def inverted_residual_shapes(size: int = 256) -> List[Tuple[int, int, int, int, int, int]]:
    """(Cin, hidden, Cout, stride, H, W) of every inverted residual in the released variants at
    ``size`` x ``size`` input, H x W being the block's input map."""
    from fastmvit.variants import VARIANTS, make_divisible

    shapes = set()
    for v in VARIANTS.values():
        cin, hw = v.stem_channels, out_size(size, 2)
        for s in v.stages:
            for j in range(s.num_ir):
                stride = s.stride if j == 0 else 1
                hidden = make_divisible(int(round(cin * s.expand)), 8)
                shapes.add((cin, hidden, s.out_channels, stride, hw, hw))
                cin, hw = s.out_channels, out_size(hw, stride)
    return sorted(shapes)


def compile_configs(arch: int = 90) -> List[CompileConfig]:
    """Every released block within the kernel's limits, in every dtype: the fusion rule
    (``fastmvit.ops.mv2_block.should_fuse``) picks among them per batch size (at batch 1 it fuses
    nearly all of them), so each may be launched. ``arch``: the launch rules of sm_<arch>."""
    configs, seen = [], set()
    for cin, hidden, cout, stride, h, w in inverted_residual_shapes():
        if cin > MAX_CIN or cout > MAX_COUT:
            continue
        residual = stride == 1 and cin == cout
        for dtype, name in TRITON_DTYPE.items():
            bm, bci, bh, bco, warps, stages = fused_config(cin, hidden, cout, dtype, interpret=False, arch=arch)
            const = {"STRIDE": stride, "RESIDUAL": residual, "VEC": vec_width(dtype, cin, hidden, cout),
                     "PREC": "ieee" if dtype == torch.float32 else "tf32",
                     "BLOCK_M": bm, "BLOCK_CI": bci, "BLOCK_H": bh, "BLOCK_CO": bco}
            key = (tuple(sorted(const.items())), name, warps)
            if key in seen:
                continue
            seen.add(key)
            sig = {"x_ptr": f"*{name}", "w1_ptr": f"*{name}", "b1_ptr": "*fp32", "wdw_ptr": "*fp32",
                   "bdw_ptr": "*fp32", "w3_ptr": f"*{name}", "b3_ptr": "*fp32", "y_ptr": f"*{name}"}
            sig.update({a: "i32" for a in ("H", "W", "OH", "OW", "M", "CIN", "HID", "COUT", "sxb", "sxh", "sxw")})
            sig.update({k: "constexpr" for k in const})
            aligned = [a for a in sig if a.endswith("_ptr")] + [
                a for a, v in (("CIN", cin), ("HID", hidden), ("COUT", cout)) if v % 16 == 0]
            aligned += ["sxb", "sxh", "sxw"] if cin % 16 == 0 else []
            configs.append(CompileConfig(
                name=f"inverted_residual-{cin}-{hidden}-{cout}-s{stride}{'-res' if residual else ''}-{name}",
                fn=_inverted_residual_kernel, signature=sig, constexprs=const, num_warps=warps,
                num_stages=stages, aligned=tuple(aligned)))
    return configs
