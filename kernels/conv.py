"""Dense 3x3 convolution (padding 1) + folded-BN bias + optional SiLU as an implicit GEMM on tensor cores.

The GEMM is ``[M = B*OH*OW pixels, K = 9 * Cin] @ [K, Cout]``; the A tile of a tap is the input pixels
under that tap, loaded straight from the NHWC activation (zero outside the map), so no im2col buffer
exists. Three MobileViT uses:

* the stem (3 -> 16 ... 64 channels, stride 2), reading the model's NCHW input in place: with
  ``9 * Cin <= 64`` the whole K axis is one gathered ``[BLOCK_M, BLOCK_K]`` tile (``FLAT_K``) and the
  input strides are arbitrary, so NCHW is just another set of strides;
* the v1 block's local conv (C -> C, C = 48 ... 160);
* the v1 fusion conv over the channel concatenation ``[x, x2]`` (2C -> C): the K loop runs over x's
  channels, then x2's (``HAS_X2``), so the concatenation never exists in memory.

Weights arrive packed ``[9 * (C1 + C2), Cout]`` (row = tap * (C1 + C2) + input channel) in the
activation dtype; the bias is float32.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import TRITON_DTYPE, CompileConfig, Launch, interpreting, silu, vec_width, target_arch
from .dwconv import out_size

FLAT_K_MAX_CIN = 7  # 9 * 7 = 63 taps x channels fit one BLOCK_K = 64 gathered tile


@triton.jit
def _implicit_gemm_pass(acc, x_b, sh, sw, C, c_off, CT, w_ptr, n, n_ok, COUT, ih0, iw0, m_ok, H, W, rk,
                        BLOCK_K: tl.constexpr, PREC: tl.constexpr):
    """acc += sum over taps and this input's C channels of x[pixel under tap, c] * w[tap * CT + c_off + c, n].
    x_b: [BLOCK_M] pointers to each pixel's image; ih0/iw0: the top-left tap's coordinates."""
    nk = tl.cdiv(C, BLOCK_K)
    for i in range(0, 9 * nk):
        tap = i // nk
        k0 = (i - tap * nk) * BLOCK_K
        ih = ih0 + tap // 3
        iw = iw0 + tap % 3
        ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        kk = k0 + rk
        k_ok = kk < C
        a_row = x_b + (ih.to(tl.int64) * sh + iw.to(tl.int64) * sw)
        a = tl.load(a_row[:, None] + kk[None, :], mask=ok[:, None] & k_ok[None, :], other=0.0)
        w_row = tap * CT + c_off + kk
        wt = tl.load(w_ptr + w_row[:, None] * COUT + n[None, :], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, wt, acc, input_precision=PREC)
    return acc


@triton.jit
def _conv3x3_kernel(
    x_ptr, x2_ptr, w_ptr, b_ptr, y_ptr,
    H, W, C1, C2, COUT, OH, OW, M,
    sxb, sxh, sxw, sxc,                       # x strides in elements, logical (b, h, w, c) order
    s2b, s2h, s2w,                            # x2 strides (channels contiguous)
    STRIDE: tl.constexpr, ACT: tl.constexpr, HAS_X2: tl.constexpr, FLAT_K: tl.constexpr,
    VEC: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # y: [B, OH, OW, COUT] contiguous
    if VEC > 1:  # the launcher checked these divide; writing it lets Triton prove 16-byte alignment
        COUT = (COUT // VEC) * VEC
        if not FLAT_K:
            C1 = (C1 // VEC) * VEC
            sxb = (sxb // VEC) * VEC
            sxh = (sxh // VEC) * VEC
            sxw = (sxw // VEC) * VEC
            if HAS_X2:
                C2 = (C2 // VEC) * VEC
                s2b = (s2b // VEC) * VEC
                s2h = (s2h // VEC) * VEC
                s2w = (s2w // VEC) * VEC
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = m < M
    n_ok = n < COUT
    ow = m % OW
    oh = (m // OW) % OH
    b = (m // (OW * OH)).to(tl.int64)
    ih0 = oh * STRIDE - 1
    iw0 = ow * STRIDE - 1
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if FLAT_K:
        # K = (tap, channel) flattened: one gathered tile covers every tap of a tiny-Cin conv (the stem)
        tap = rk // C1
        ci = rk - tap * C1
        kh = tap // 3
        kw = tap - kh * 3
        k_ok = rk < 9 * C1
        ih = ih0[:, None] + kh[None, :]
        iw = iw0[:, None] + kw[None, :]
        ok = m_ok[:, None] & k_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        off = b[:, None] * sxb + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw + ci[None, :].to(tl.int64) * sxc
        a = tl.load(x_ptr + off, mask=ok, other=0.0)
        wt = tl.load(w_ptr + rk[:, None] * COUT + n[None, :], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, wt, acc, input_precision=PREC)
    else:
        # The K loop runs over (tap, channel chunk) flattened: one software-pipelined loop per input
        # rather than nine short ones (C = 48 is three chunks of 16), and a fraction of the compile time.
        CT = C1 + C2
        acc = _implicit_gemm_pass(acc, x_ptr + b * sxb, sxh, sxw, C1, 0, CT, w_ptr, n, n_ok, COUT, ih0, iw0, m_ok,
                                  H, W, rk, BLOCK_K, PREC)
        if HAS_X2:  # channels [C1, C1 + C2) of the virtual concatenation
            acc = _implicit_gemm_pass(acc, x2_ptr + b * s2b, s2h, s2w, C2, C1, CT, w_ptr, n, n_ok, COUT, ih0, iw0,
                                      m_ok, H, W, rk, BLOCK_K, PREC)
    acc += tl.load(b_ptr + n, mask=n_ok, other=0.0)[None, :]
    if ACT:
        acc = silu(acc)
    y_off = m.to(tl.int64)[:, None] * COUT + n[None, :]
    tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


# --------------------------------------------------------------------------------------------------
# launch configuration
# --------------------------------------------------------------------------------------------------

def _block_n(cout: int) -> int:
    """Largest of 128/64/32/16 that pads Cout by at most a third (one N block re-reads A the fewest
    times), else the least padding: Cout 48 -> 64, 80 -> 32, 96 -> 128, 160 -> 64."""
    cands = [c for c in (128, 64, 32, 16) if c <= max(16, triton.next_power_of_2(cout))]
    for c in cands:
        if 3 * triton.cdiv(cout, c) * c <= 4 * cout:
            return c
    return min(cands, key=lambda c: (triton.cdiv(cout, c) * c, -c))


def conv3x3_config(c1: int, c2: int, cout: int, M: int, dtype: torch.dtype, flat: bool,
                   interpret: Optional[bool] = None, arch: int = 90) -> Tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages), a fixed rule (no autotuning: nothing could be
    measured, and CUDA-graph capture must not meet a first-call benchmark). BLOCK_K is the largest of
    64/32/16 dividing the input widths so the K loop has no ragged tail; float32 uses smaller tiles
    (BLOCK_K 16, BLOCK_N <= 64) since its exact ("ieee") dot runs on FMA units and holds both operands
    in registers (BLOCK_K 32 spilled on sm_80). Below sm_90 (``arch``; mma.sync keeps each warp's
    accumulators and operand fragments in registers) a tile of 128x64 outputs with BLOCK_K 64 takes 8
    warps, not 4: the 64+64 fusion conv's took 255 registers and spilled under triton 3.6 (8 warps: 172)."""
    if interpreting() if interpret is None else interpret:
        bk = triton.next_power_of_2(9 * c1) if flat else min(128, triton.next_power_of_2(max(c1, c2)))
        bm = min(512, max(16, triton.next_power_of_2(M)))
        return bm, max(16, min(256, triton.next_power_of_2(cout))), max(16, bk), 4, 1
    fp32 = dtype == torch.float32
    if flat:  # a gather-bound tile: 64 pixels keep it at ~96 registers, so more programs hide latency
        bn = max(16, min(64 if fp32 else 128, triton.next_power_of_2(cout)))
        return 64, bn, max(16, triton.next_power_of_2(9 * c1)), 4, 1
    widths = [c1] + ([c2] if c2 else [])
    bk = 16 if fp32 else next((k for k in (64, 32, 16) if all(w % k == 0 for w in widths)), 16)
    bn = min(_block_n(cout), 64) if fp32 else _block_n(cout)
    bm = 64 if fp32 or M < 8192 else 128
    wide = bm * bn >= 128 * 128 or (arch < 90 and bm * bn * bk >= 128 * 64 * 64)
    return bm, bn, bk, (8 if wide else 4), (2 if fp32 else 3)


def conv3x3_plan(x: torch.Tensor, x_strides: Tuple[int, int, int, int], H: int, W: int, c1: int,
                 x2: Optional[torch.Tensor], y_shape: Tuple[int, int, int, int], stride: int, act: bool) -> Launch:
    """The launch for tensors like these (metadata only): ``plan(x, x2 or x, w, bias, y)`` writes a
    contiguous ``y [B, OH, OW, Cout]``. x holds ``c1`` channels of an ``H x W`` map with strides
    ``x_strides`` in logical (b, h, w, c) order (an NCHW tensor passes ``(s0, s2, s3, s1)``); ``x2`` is
    the NHWC second input of the fusion conv, or None."""
    B, OH, OW, cout = y_shape
    c2 = x2.shape[-1] if x2 is not None else 0
    M = B * OH * OW
    flat = x2 is None and c1 <= FLAT_K_MAX_CIN
    bm, bn, bk, warps, stages = conv3x3_config(c1, c2, cout, M, x.dtype, flat, arch=target_arch(x.device))
    sxb, sxh, sxw, sxc = x_strides
    s2 = x2.stride()[:3] if x2 is not None else (0, 0, 0)
    vec = vec_width(x.dtype, cout) if flat else vec_width(x.dtype, cout, c1, c2, sxb, sxh, sxw, *s2)
    prec = "ieee" if x.dtype == torch.float32 else "tf32"  # tf32 is ignored for 16-bit operands
    grid = (triton.cdiv(M, bm), triton.cdiv(cout, bn))
    return Launch(_conv3x3_kernel, grid, (H, W, c1, c2, cout, OH, OW, M, sxb, sxh, sxw, sxc, *s2),
                  STRIDE=stride, ACT=act, HAS_X2=x2 is not None, FLAT_K=flat, VEC=vec, PREC=prec,
                  BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)


def conv3x3_launch(x: torch.Tensor, x_strides: Tuple[int, int, int, int], H: int, W: int, c1: int,
                   x2: Optional[torch.Tensor], w: torch.Tensor, bias: torch.Tensor, y: torch.Tensor,
                   stride: int, act: bool) -> torch.Tensor:
    """Launch (traceably) into a preallocated contiguous ``y [B, OH, OW, Cout]``; see ``conv3x3_plan``."""
    conv3x3_plan(x, x_strides, H, W, c1, x2, tuple(y.shape), stride, act).traced(
        x, x2 if x2 is not None else x, w, bias, y)
    return y


# --------------------------------------------------------------------------------------------------
# every specialisation the engine launches
# --------------------------------------------------------------------------------------------------

def conv3x3_uses(size: int = 256) -> List[Tuple[str, int, int, int, int, int]]:
    """(kind, C1, C2, Cout, stride, output pixels per image) of every dense 3x3 in the released variants
    at ``size`` x ``size``: "stem", "local" (v1 conv_kxk) and "fusion" (v1 conv_fusion)."""
    from fastmvit.variants import VARIANTS

    uses = set()
    for v in VARIANTS.values():
        hw = out_size(size, 2)
        uses.add(("stem", 3, 0, v.stem_channels, 2, hw * hw))
        for s in v.stages:
            hw = out_size(hw, s.stride)
            if s.transformer is not None and v.family == "v1":
                uses.add(("local", s.out_channels, 0, s.out_channels, 1, hw * hw))
                uses.add(("fusion", s.out_channels, s.out_channels, s.out_channels, 1, hw * hw))
    return sorted(uses)


def compile_configs(arch: int = 90) -> List[CompileConfig]:
    """One config per (use, dtype, tile): batch 1 and batch 256 can pick different BLOCK_M. ``arch``: the
    launch rules of sm_<arch>."""
    configs, seen = [], set()
    for kind, c1, c2, cout, stride, pixels in conv3x3_uses():
        flat = kind == "stem"
        for dtype, name in TRITON_DTYPE.items():
            for batch in (1, 256):
                bm, bn, bk, warps, stages = conv3x3_config(c1, c2, cout, batch * pixels, dtype, flat, interpret=False,
                                                           arch=arch)
                vec = vec_width(dtype, cout) if flat else vec_width(dtype, cout, c1, c2)
                prec = "ieee" if dtype == torch.float32 else "tf32"
                const = {"STRIDE": stride, "ACT": True, "HAS_X2": bool(c2), "FLAT_K": flat, "VEC": vec,
                         "PREC": prec, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}
                key = (tuple(sorted(const.items())), name, warps, stages)
                if key in seen:
                    continue
                seen.add(key)
                sig = {"x_ptr": f"*{name}", "x2_ptr": f"*{name}", "w_ptr": f"*{name}", "b_ptr": "*fp32",
                       "y_ptr": f"*{name}"}
                sig.update({a: "i32" for a in ("H", "W", "C1", "C2", "COUT", "OH", "OW", "M", "sxb", "sxh", "sxw",
                                               "sxc", "s2b", "s2h", "s2w")})
                sig.update({k: "constexpr" for k in const})
                aligned = ["x_ptr", "x2_ptr", "w_ptr", "b_ptr", "y_ptr"]
                aligned += [a for a, v in (("C1", c1), ("C2", c2), ("COUT", cout)) if v % 16 == 0]
                if not flat:  # NHWC strides are multiples of C
                    aligned += ["sxb", "sxh", "sxw"] + (["s2b", "s2h", "s2w"] if c2 else [])
                configs.append(CompileConfig(
                    name=f"conv3x3-{kind}-C{c1}+{c2}-O{cout}-BM{bm}BN{bn}BK{bk}-{name}", fn=_conv3x3_kernel,
                    signature=sig, constexprs=const, num_warps=warps, num_stages=stages, aligned=tuple(aligned)))
    return configs
