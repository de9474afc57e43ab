"""1x1 convolutions of the DeepLabV3 head over up to four NHWC inputs: ``y = act(cat(x0..x3) @ W + bias)``.

The ASPP projection is a 1x1 conv-BN-ReLU over the channel concatenation of five branches. Four are maps
(the 1x1 branch and the three atrous 3x3 ones): the K loop runs over each input's channels in turn
(``NUM_IN``), as the v1 fusion conv reads its two inputs, so the concatenation never exists in memory. The
fifth, the image-pooling branch, is constant over each image: its part of the product is a [B, C] x [C, C]
product done once per image beforehand (``fastmvit.ops.pool``) and enters here as a per-image bias
(``IMG_BIAS``: bias[row // HW]). With one input the same kernel is the 1x1 branch (ReLU) and the
classifier (bias, no activation).

Inputs are contiguous ``[M, K]`` rows (M = B * H * W pixels), all with the same K; weights arrive as
``gemm.pack_linear`` packs them: ``[NUM_IN * K, N_pad]`` (W^T, zero columns up to a multiple of 16) in the
activation dtype; the bias is float32 ``[N]`` or ``[B, N]``; y is ``[M, N]`` in the activation dtype.
"""
from __future__ import annotations

from typing import List, Tuple

import torch
import triton
import triton.language as tl

from ._common import TRITON_DTYPE, CompileConfig, Launch, interpreting, vec_width

# The head of Apple's published DeepLabV3 checkpoints (fastmvit.model.segmentation.SegmentationConfig's
# defaults; a test holds the two equal): ASPP width by family, PASCAL VOC's classes.
ASPP_CHANNELS = {"v1": 256, "v2": 512}
VOC_CLASSES = 21


@triton.jit
def _input_pass(acc, x_ptr, m64, m_ok, K, k_base, w_ptr, WN, n, n_ok, rk, BLOCK_K: tl.constexpr,
                PREC: tl.constexpr):
    """acc += x[m, :] @ w[k_base : k_base + K, n] (one input of the virtual concatenation)."""
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        k_ok = kk < K
        a = tl.load(x_ptr + m64[:, None] * K + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        wt = tl.load(w_ptr + (k_base + kk).to(tl.int64)[:, None] * WN + n[None, :],
                     mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, wt, acc, input_precision=PREC)
    return acc


@triton.jit
def _pointwise_kernel(
    x0_ptr, x1_ptr, x2_ptr, x3_ptr, w_ptr, b_ptr, y_ptr,
    M, HW, K, N, WN,                          # WN: the packed weight's row stride (N padded to 16)
    NUM_IN: tl.constexpr, IMG_BIAS: tl.constexpr, RELU: tl.constexpr, VEC: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    if VEC > 1:  # the launcher checked these divide; writing it lets Triton prove 16-byte alignment
        K = (K // VEC) * VEC
        WN = (WN // VEC) * VEC
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = m < M
    n_ok = n < N
    m64 = m.to(tl.int64)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc = _input_pass(acc, x0_ptr, m64, m_ok, K, 0, w_ptr, WN, n, n_ok, rk, BLOCK_K, PREC)
    if NUM_IN > 1:
        acc = _input_pass(acc, x1_ptr, m64, m_ok, K, K, w_ptr, WN, n, n_ok, rk, BLOCK_K, PREC)
    if NUM_IN > 2:
        acc = _input_pass(acc, x2_ptr, m64, m_ok, K, 2 * K, w_ptr, WN, n, n_ok, rk, BLOCK_K, PREC)
    if NUM_IN > 3:
        acc = _input_pass(acc, x3_ptr, m64, m_ok, K, 3 * K, w_ptr, WN, n, n_ok, rk, BLOCK_K, PREC)
    mask = m_ok[:, None] & n_ok[None, :]
    if IMG_BIAS:  # the image-pooling branch's share of the projection, one row per image
        img = (m // HW).to(tl.int64)
        acc += tl.load(b_ptr + img[:, None] * N + n[None, :], mask=mask, other=0.0)
    else:
        acc += tl.load(b_ptr + n, mask=n_ok, other=0.0)[None, :]
    if RELU:
        acc = tl.maximum(acc, 0.0)
    tl.store(y_ptr + m64[:, None] * N + n[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


def pointwise_config(K: int, N: int, M: int, dtype: torch.dtype, interpret=None) -> Tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages), a fixed rule like the dense conv's: 16-bit
    operands get 128 x 128 tiles (64 pixels for small maps), float32's exact dots smaller ones (they run
    on FMA units with both operands in registers)."""
    if interpreting() if interpret is None else interpret:
        return (min(256, max(16, triton.next_power_of_2(M))), max(16, min(256, triton.next_power_of_2(N))),
                max(16, min(128, triton.next_power_of_2(K))), 4, 1)
    bn = max(16, min(128, triton.next_power_of_2(N)))
    if dtype == torch.float32:
        return 64, min(bn, 64), 16, 4, 2
    bk = next((k for k in (64, 32, 16) if K % k == 0), 16)
    bm = 128 if M >= 8192 else 64
    return bm, bn, bk, (8 if bm * bn >= 128 * 128 else 4), 3


def pointwise_plan(x: torch.Tensor, num_in: int, w: torch.Tensor, n_out: int, hw: int, image_bias: bool,
                   relu: bool) -> Launch:
    """The launch for inputs like ``x`` ([M, K] contiguous, ``num_in`` of them) and a packed ``w``
    (metadata only): ``plan(x0, x1, x2, x3, w, bias, y)`` (absent inputs: pass x0) writes ``y [M, n_out]``."""
    M, K = x.shape
    bm, bn, bk, warps, stages = pointwise_config(K, n_out, M, x.dtype)
    vec = vec_width(x.dtype, K, w.stride(0))
    prec = "ieee" if x.dtype == torch.float32 else "tf32"
    grid = (triton.cdiv(M, bm), triton.cdiv(n_out, bn))
    return Launch(_pointwise_kernel, grid, (M, hw, K, n_out, w.stride(0)), NUM_IN=num_in, IMG_BIAS=image_bias,
                  RELU=relu, VEC=vec, PREC=prec, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps,
                  num_stages=stages)


# --------------------------------------------------------------------------------------------------
# every specialisation the engine launches
# --------------------------------------------------------------------------------------------------

def pointwise_uses(size: int = 512) -> List[Tuple[str, int, int, int, bool, bool, int]]:
    """(kind, K, N, inputs, per-image bias, ReLU, pixels per image) of the DeepLabV3 heads of the released
    variants at ``size`` x ``size``, output stride 16, with Apple's 21 classes: "branch" (the 1x1 ASPP
    branch), "project" (over the four map branches) and "classifier"."""
    from fastmvit.variants import VARIANTS

    hw = (size // 16) ** 2
    uses = set()
    for v in VARIANTS.values():
        c = ASPP_CHANNELS[v.family]
        uses.update({("branch", v.stage_channels[-1], c, 1, False, True, hw), ("project", c, c, 4, True, True, hw),
                     ("classifier", c, VOC_CLASSES, 1, False, False, hw)})
    return sorted(uses)


def compile_configs() -> List[CompileConfig]:
    configs, seen = [], set()
    for kind, K, N, num_in, img, relu, hw in pointwise_uses():
        wn = -(-N // 16) * 16
        for dtype, name in TRITON_DTYPE.items():
            for batch in (1, 32):
                bm, bn, bk, warps, stages = pointwise_config(K, N, batch * hw, dtype, interpret=False)
                const = {"NUM_IN": num_in, "IMG_BIAS": img, "RELU": relu, "VEC": vec_width(dtype, K, wn),
                         "PREC": "ieee" if dtype == torch.float32 else "tf32", "BLOCK_M": bm, "BLOCK_N": bn,
                         "BLOCK_K": bk}
                key = (tuple(sorted(const.items())), name, warps, stages)
                if key in seen:
                    continue
                seen.add(key)
                sig = {p: f"*{name}" for p in ("x0_ptr", "x1_ptr", "x2_ptr", "x3_ptr", "w_ptr")}
                sig.update({"b_ptr": "*fp32", "y_ptr": f"*{name}"})
                sig.update({a: "i32" for a in ("M", "HW", "K", "N", "WN")})
                sig.update({k: "constexpr" for k in const})
                aligned = ("K", "WN") + (("N",) if N % 16 == 0 else ())
                configs.append(CompileConfig(
                    name=f"pointwise-{kind}-K{K}x{num_in}-N{N}-BM{bm}BN{bn}BK{bk}-{name}", fn=_pointwise_kernel,
                    signature=sig, constexprs=const, num_warps=warps, num_stages=stages, aligned=aligned))
    return configs
