"""MobileViTv2 separable-attention context vectors, read in place from the NHWC qkv token matrix.

For sample b and patch pixel position p = i*2 + j, the N = (H/2)*(W/2) pixels (2r+i, 2c+j) form one
sequence; with q = qkv[..., q_col] and k = qkv[..., k_col : k_col+d]:

    cv[b, p, :] = sum_n softmax_n(q)[n] * k[n, :]          (float32 [B, 4, d])

One program per (b, p, block of BD channels) streams the sequence once in chunks of BT pixels with an
online softmax (running max and sum, fp32): q is re-read by each channel block (1 value per pixel against
BD), so splitting channels costs little and gives B*4*cdiv(d, BD) programs.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import TRITON_DTYPE, CompileConfig, Launch, empty_output, interpreting, poisoning

__all__ = ["context", "compile_configs"]


@triton.jit
def context_kernel(qkv_ptr, cv_ptr, stride_m, q_col, k_col, D, H, W,
                   BT: tl.constexpr, BD: tl.constexpr):
    """qkv: rows m = (b*H + h)*W + w with row stride stride_m; cv: [B, 4, D] float32."""
    pid_bp = tl.program_id(0)
    b = pid_bp // 4
    i = (pid_bp % 4) // 2
    j = pid_bp % 2
    offs_d = tl.program_id(1) * BD + tl.arange(0, BD)
    d_ok = offs_d < D
    half_w = W // 2
    n_tok = (H // 2) * half_w
    base = qkv_ptr + b.to(tl.int64) * H * W * stride_m
    m_run = tl.full([1], float("-inf"), tl.float32)
    l_run = tl.zeros([1], dtype=tl.float32)
    acc = tl.zeros([BD], dtype=tl.float32)
    for t0 in range(0, n_tok, BT):
        n = t0 + tl.arange(0, BT)
        ok = n < n_tok
        pix = ((n // half_w) * 2 + i) * W + (n % half_w) * 2 + j
        row = base + pix.to(tl.int64) * stride_m
        q = tl.load(row + q_col, mask=ok, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m_run, tl.max(q, axis=0))
        alpha = tl.exp(m_run - m_new)
        e = tl.exp(q - m_new)
        k = tl.load(row[:, None] + k_col + offs_d[None, :], mask=ok[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha + tl.sum(e[:, None] * k.to(tl.float32), axis=0)
        l_run = l_run * alpha + tl.sum(e, axis=0)
        m_run = m_new
    tl.store(cv_ptr + pid_bp.to(tl.int64) * D + offs_d, tl.fdiv(acc, l_run), mask=d_ok)


def _blocks(d: int, n_tok: int):
    if interpreting():
        return min(triton.next_power_of_2(n_tok), 512), triton.next_power_of_2(d)
    # 64 channels x 64 pixels per step: 32 fp32 values per thread with 4 warps, 128-byte fp16 row reads.
    return 64, 64


class ContextPlan:
    """``context`` resolved for one signature: ``plan(qkv)`` allocates cv and launches."""

    __slots__ = ("launch", "out_shape", "device", "poison")

    def __init__(self, launch_, out_shape, device, poison):
        self.launch, self.out_shape, self.device, self.poison = launch_, out_shape, device, poison

    def __call__(self, qkv: torch.Tensor, traced: bool = False) -> torch.Tensor:
        cv = empty_output(self.out_shape, torch.float32, self.device, self.poison)
        (self.launch.traced if traced else self.launch)(qkv, cv)
        return cv


def context_plan(qkv: torch.Tensor, d: int, H: int, W: int, q_col: int = 0, k_col: int = 1,
                 blocks: Optional[Tuple[int, int]] = None) -> ContextPlan:
    """The launch for a qkv [B*H*W, C] (column stride 1) like this one (metadata only)."""
    B = qkv.shape[0] // (H * W)
    BT, BD = blocks or _blocks(d, (H // 2) * (W // 2))
    grid = (B * 4, triton.cdiv(d, BD))
    kernel_launch = Launch(context_kernel, grid, (qkv.stride(0), q_col, k_col, d, H, W), BT=BT, BD=BD,
                           num_warps=4, num_stages=3)
    return ContextPlan(kernel_launch, (B, 4, d), qkv.device, poisoning())


def context(qkv: torch.Tensor, d: int, H: int, W: int, q_col: int = 0, k_col: int = 1,
            blocks: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """qkv [B*H*W, C] (column stride 1) -> cv [B, 4, d] float32 (launched traceably); arguments checked
    by the ops layer. blocks: (BT, BD) to override the launch rule (tests)."""
    return context_plan(qkv, d, H, W, q_col, k_col, blocks)(qkv, traced=True)


def compile_configs() -> List[CompileConfig]:
    """Per activation dtype: the padded k | v | q layout of ``pack_qkv`` (row stride, k_col and the
    output 16-divisible) and the checkpoints' q | k | v layout (row stride 2d + 1, k_col = 1)."""
    out = []
    for name in TRITON_DTYPE.values():
        sig = {"qkv_ptr": f"*{name}", "cv_ptr": "*fp32", "stride_m": "i32", "q_col": "i32", "k_col": "i32",
               "D": "i32", "H": "i32", "W": "i32", "BT": "constexpr", "BD": "constexpr"}
        for div16, tag in ((("qkv_ptr", "cv_ptr", "stride_m", "k_col", "D"), "packed"), (("qkv_ptr", "cv_ptr"), "qkv")):
            out.append(CompileConfig(f"sepattn_context-{name}-{tag}", context_kernel, sig,
                                            {"BT": 64, "BD": 64}, 4, 3, aligned=div16))
    return out
