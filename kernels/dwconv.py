"""Depthwise 3x3 convolution + bias (BatchNorm folded) + optional SiLU on NHWC activations.

Pure memory traffic: every output element reads nine inputs that neighbouring tiles also read, so the
kernel walks a tile of consecutive output pixels x a block of channels, loads each tap as a
``[BLOCK_P, BLOCK_C]`` slab (16-byte vectors along the contiguous channel axis) and leaves the 9x reuse
to L1/L2. Used by the unfused inverted-residual path (hidden widths 32 ... 1536) and by the MobileViTv2
block's local conv (C = 128 ... 1024, dilated in the segmentation backbones).

The dilation is a run-time integer (``do_not_specialize``: not even Triton's value-1 specialisation), so
dilations 1, 2 and 4 share one compiled kernel per (tile, stride, dtype): the segmentation backbones add
no compile to the classifiers' set.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import TRITON_DTYPE, CompileConfig, Launch, interpreting, silu, vec_width


# --------------------------------------------------------------------------------------------------
# the kernel
# --------------------------------------------------------------------------------------------------

@triton.jit(do_not_specialize=["dil"])
def _dwconv3x3_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr,
    H, W, C, OH, OW, M,                      # M = B * OH * OW output pixels
    sxb, sxh, sxw,                           # input strides in elements (channel stride is 1)
    dil,                                     # dilation (>= 1), padding = dilation
    STRIDE: tl.constexpr, ACT: tl.constexpr, VEC: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # x: [B, H, W, C] (strided, channels contiguous); w: [9, C] fp32 tap-major; b: [C] fp32
    # y: [B, OH, OW, C] contiguous
    if VEC > 1:  # the launcher checked these divide; writing it lets Triton prove 16-byte alignment
        C = (C // VEC) * VEC
        sxb = (sxb // VEC) * VEC
        sxh = (sxh // VEC) * VEC
        sxw = (sxw // VEC) * VEC
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    p_ok = p < M
    c_ok = c < C
    ow = p % OW
    oh = (p // OW) % OH
    b = p // (OW * OH)
    ih0 = oh * STRIDE - dil  # padding = dilation keeps 'same' size at stride 1
    iw0 = ow * STRIDE - dil
    # One 64-bit address per pixel (its top-left tap) and a loop over the nine taps, not an unrolled one:
    # unrolled, the compiler hoists every tap's loads and addresses (136 registers on sm_90 for fp16)
    x_pix = x_ptr + (b.to(tl.int64) * sxb + ih0.to(tl.int64) * sxh + iw0.to(tl.int64) * sxw)
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for t in tl.range(0, 9, num_stages=1):
        kh = t // 3
        kw = t - kh * 3
        ih = ih0 + kh * dil
        iw = iw0 + kw * dil
        ok = p_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        xv = tl.load(x_pix[:, None] + (kh * dil * sxh + kw * dil * sxw + c)[None, :],
                     mask=ok[:, None] & c_ok[None, :], other=0.0)
        wv = tl.load(w_ptr + t * C + c, mask=c_ok, other=0.0)
        acc += xv.to(tl.float32) * wv[None, :]
    acc += tl.load(b_ptr + c, mask=c_ok, other=0.0)[None, :]
    if ACT:
        acc = silu(acc)
    y_off = p.to(tl.int64)[:, None] * C + c[None, :]
    tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=p_ok[:, None] & c_ok[None, :])


# --------------------------------------------------------------------------------------------------
# launcher
# --------------------------------------------------------------------------------------------------

def out_size(n: int, stride: int) -> int:
    """Output extent of a 3x3 convolution with padding = dilation (the dilation cancels out)."""
    return (n - 1) // stride + 1


def dwconv_config(C: int, M: int = 1 << 30, interpret: bool | None = None,
                  elem_bytes: int = 2) -> Tuple[int, int, int]:
    """(BLOCK_P, BLOCK_C, num_warps): up to 64 channels (128 bytes of fp16) per row so a warp's loads
    are whole cache lines, and 4 KiB of output per program (two 16-byte vectors per thread: 2048
    half-precision or 1024 float32 elements) so narrow maps (C = 16) still give each thread full
    vectors; more per thread costs registers (four fp32 vectors: 102 on sm_90 under triton 3.6) for a
    kernel that only waits on memory. The interpreter gets one large tile (its cost is per program), no
    larger than the M output pixels need."""
    if interpreting() if interpret is None else interpret:
        return min(512, max(16, triton.next_power_of_2(M))), min(triton.next_power_of_2(C), 512), 4
    block_c = min(triton.next_power_of_2(C), 64)
    return max(16, 4096 // elem_bytes // block_c), block_c, 4


def dwconv3x3_plan(x: torch.Tensor, y_shape: Tuple[int, int, int, int], stride: int, dilation: int,
                   act: bool) -> Launch:
    """The launch for an x like this one (metadata only): ``plan(x, w, bias, y)`` writes a contiguous
    ``y`` of ``y_shape``."""
    B, H, W, C = x.shape
    OH, OW = y_shape[1], y_shape[2]
    M = B * OH * OW
    block_p, block_c, warps = dwconv_config(C, M, elem_bytes=x.element_size())
    sxb, sxh, sxw = x.stride(0), x.stride(1), x.stride(2)
    vec = vec_width(x.dtype, C, sxb, sxh, sxw)
    grid = (triton.cdiv(M, block_p), triton.cdiv(C, block_c))
    return Launch(_dwconv3x3_kernel, grid, (H, W, C, OH, OW, M, sxb, sxh, sxw, dilation),
                  STRIDE=stride, ACT=act, VEC=vec, BLOCK_P=block_p, BLOCK_C=block_c,
                  num_warps=warps)


def dwconv3x3_launch(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor, y: torch.Tensor,
                     stride: int, dilation: int, act: bool) -> torch.Tensor:
    """Launch (traceably) into a preallocated contiguous ``y``."""
    dwconv3x3_plan(x, tuple(y.shape), stride, dilation, act).traced(x, w, bias, y)
    return y


# --------------------------------------------------------------------------------------------------
# every specialisation the engine launches
# --------------------------------------------------------------------------------------------------

# Registers per thread above which ``python -m fastmvit.kernels check`` fails, by arch and dtype: the
# kernel only waits on memory, so occupancy is what it needs (sm_90, triton 3.9: fp16 66, bf16 53, fp32
# 56; unrolling the nine taps again gives 138 / 142 / 106).
REGISTER_CAPS = {90: {"fp16": 80, "bf16": 80, "fp32": 96}}


def max_registers(cfg: CompileConfig, arch: int) -> Optional[int]:
    """The register cap of one specialisation on sm_<arch> (None: no cap)."""
    return REGISTER_CAPS.get(arch, {}).get(cfg.name.rsplit("-", 1)[-1])


def _depthwise_shapes() -> List[Tuple[int, int, int]]:
    """(C, stride, dilation) of every depthwise conv in the ten released variants: the inverted
    residuals' hidden widths (unfused path) and the v2 blocks' local conv, plus dilation 2 for the v2
    segmentation backbones (output stride 16/8 dilates the stride-2 stages' local convs)."""
    from fastmvit.variants import VARIANTS, make_divisible

    shapes = set()
    for v in VARIANTS.values():
        cin = v.stem_channels
        for s in v.stages:
            for j in range(s.num_ir):
                hidden = make_divisible(int(round(cin * s.expand)), 8)
                shapes.add((hidden, s.stride if j == 0 else 1, 1))
                cin = s.out_channels
            if s.transformer is not None and v.family == "v2":
                shapes.update({(cin, 1, 1), (cin, 1, 2)})
    return sorted(shapes)


def compile_configs() -> List[CompileConfig]:
    """Specialisations differ only in constexprs: (C's block and vector width, stride, dtype); the dilation
    is a run-time argument. act is on for every depthwise conv MobileViT has. Every MobileViT width is a
    multiple of 16, so VEC is the full 16-byte vector."""
    configs, seen = [], set()
    for C, stride, _ in _depthwise_shapes():
        for dtype, name in TRITON_DTYPE.items():
            block_p, block_c, warps = dwconv_config(C, interpret=False, elem_bytes=dtype.itemsize)
            vec = vec_width(dtype, C)
            key = (block_p, block_c, stride, name)
            if key in seen:
                continue
            seen.add(key)
            sig = {"x_ptr": f"*{name}", "w_ptr": "*fp32", "b_ptr": "*fp32", "y_ptr": f"*{name}",
                   "H": "i32", "W": "i32", "C": "i32", "OH": "i32", "OW": "i32", "M": "i32",
                   "sxb": "i32", "sxh": "i32", "sxw": "i32", "dil": "i32", "STRIDE": "constexpr",
                   "ACT": "constexpr", "VEC": "constexpr", "BLOCK_P": "constexpr", "BLOCK_C": "constexpr"}
            configs.append(CompileConfig(
                name=f"dwconv3x3-BP{block_p}-BC{block_c}-s{stride}-{name}", fn=_dwconv3x3_kernel,
                signature=sig, num_warps=warps,
                constexprs={"STRIDE": stride, "ACT": True, "VEC": vec, "BLOCK_P": block_p,
                            "BLOCK_C": block_c},
                aligned=("C", "sxb", "sxh", "sxw")))
    return configs

