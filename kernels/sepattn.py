"""MobileViTv2 separable-attention context vectors, read in place from the NHWC qkv token matrix.

For sample b and patch pixel position p = i*2 + j, the N = (H/2)*(W/2) pixels (2r+i, 2c+j) form one
sequence; with q = qkv[..., q_col] and k = qkv[..., k_col : k_col+d]:

    cv[b, p, :] = sum_n softmax_n(q)[n] * k[n, :]          (float32 [B, 4, d])

One program per (b, p, block of BD channels) streams the sequence once in chunks of BT pixels with an
online softmax (running max and sum, fp32): q is re-read by each channel block (1 value per pixel against
BD), so splitting channels costs little and gives B*4*cdiv(d, BD) programs.

Split over tokens (``SPLIT``, program axis 2; the split rule of ``_common`` decides): each of S programs
streams a contiguous run of whole BT chunks and writes its (max, sum, unnormalised context) to a float32
workspace; ``context_merge_kernel`` rescales every split to the common max and adds them in split order
(deterministic, no atomics). At the released sizes at 256^2 the sequences are 16 ... 256 tokens (1 ... 4
steps) and the rule never splits; it does from maps of about 96x96 (36 steps; v2's stage 3 at 768^2) up.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import (STEP_GEMM, TRITON_DTYPE, CompileConfig, Launch, empty_output, interpreting, poisoning, sm_count,
                      split_override, split_rule)

__all__ = ["context", "compile_configs"]


@triton.jit
def context_kernel(qkv_ptr, cv_ptr, stride_m, q_col, k_col, D, H, W,
                   BT: tl.constexpr, BD: tl.constexpr, SPLIT: tl.constexpr):
    """qkv: rows m = (b*H + h)*W + w with row stride stride_m; cv: [B, 4, D] float32, or with SPLIT the
    workspace of S = num_programs(2) splits: contexts [S, B*4, D], then (max, sum) [S, B*4, cdiv(D, BD), 2]."""
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
    lo, hi = 0, n_tok
    if SPLIT:  # this program's run of whole BT chunks (an empty run leaves max -inf, sum 0, context 0)
        chunk = tl.cdiv(tl.cdiv(n_tok, BT), tl.num_programs(2)) * BT
        lo = tl.program_id(2) * chunk
        hi = tl.minimum(lo + chunk, n_tok)
    for t0 in range(lo, hi, BT):
        n = t0 + tl.arange(0, BT)
        ok = n < hi
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
    if SPLIT:
        slot = tl.program_id(2) * tl.num_programs(0) + pid_bp  # (split, b*4 + p)
        tl.store(cv_ptr + slot.to(tl.int64) * D + offs_d, acc, mask=d_ok)
        ml = cv_ptr + tl.num_programs(2).to(tl.int64) * tl.num_programs(0) * D  # after every split's contexts
        ml += (slot.to(tl.int64) * tl.num_programs(1) + tl.program_id(1)) * 2
        two = tl.arange(0, 2)
        tl.store(ml + two, tl.where(two == 0, m_run, l_run))
    else:
        tl.store(cv_ptr + pid_bp.to(tl.int64) * D + offs_d, tl.fdiv(acc, l_run), mask=d_ok)


@triton.jit
def context_merge_kernel(ws_ptr, cv_ptr, D, SPLIT, BD: tl.constexpr):
    """cv[bp, d] = sum_s exp(m_s - M) * acc_s[d] / sum_s exp(m_s - M) * l_s with M = max_s m_s: every split's
    partial context rescaled to the common max, added in split order. Grid (B*4, cdiv(D, BD)) as the
    split kernel's first two axes; ws is its workspace (see ``context_kernel``)."""
    pid_bp = tl.program_id(0)
    n_bp = tl.num_programs(0)
    offs_d = tl.program_id(1) * BD + tl.arange(0, BD)
    d_ok = offs_d < D
    ml = ws_ptr + SPLIT * n_bp.to(tl.int64) * D + (pid_bp.to(tl.int64) * tl.num_programs(1) + tl.program_id(1)) * 2
    ml_split = n_bp * tl.num_programs(1) * 2  # from one split's (max, sum) to the next's
    m_all = tl.load(ml)
    for s in range(1, SPLIT):
        m_all = tl.maximum(m_all, tl.load(ml + s * ml_split))
    acc = tl.zeros([BD], dtype=tl.float32)
    l_all = tl.full([], 0.0, tl.float32)
    for s in range(0, SPLIT):
        scale = tl.exp(tl.load(ml + s * ml_split) - m_all)
        l_all += scale * tl.load(ml + s * ml_split + 1)
        acc += scale * tl.load(ws_ptr + (s * n_bp + pid_bp).to(tl.int64) * D + offs_d, mask=d_ok, other=0.0)
    tl.store(cv_ptr + pid_bp.to(tl.int64) * D + offs_d, tl.fdiv(acc, l_all), mask=d_ok)


def _blocks(d: int, n_tok: int):
    if interpreting():
        return min(triton.next_power_of_2(n_tok), 512), triton.next_power_of_2(d)
    # 64 channels x 64 pixels per step: 32 fp32 values per thread with 4 warps, 128-byte fp16 row reads.
    return 64, 64


class ContextPlan:
    """``context`` resolved for one signature: ``plan(qkv)`` allocates cv (and a split's workspace) and
    launches. ``decision``: the split rule's ``SplitDecision``; ``merge`` is None when unsplit."""

    __slots__ = ("launch", "merge", "out_shape", "ws_shape", "device", "poison", "decision")

    def __init__(self, launch_, out_shape, device, poison, merge=None, ws_shape=None, decision=None):
        self.launch, self.out_shape, self.device, self.poison = launch_, out_shape, device, poison
        self.merge, self.ws_shape, self.decision = merge, ws_shape, decision

    def __call__(self, qkv: torch.Tensor, traced: bool = False) -> torch.Tensor:
        cv = empty_output(self.out_shape, torch.float32, self.device, self.poison)
        if self.merge is None:
            (self.launch.traced if traced else self.launch)(qkv, cv)
            return cv
        ws = empty_output(self.ws_shape, torch.float32, self.device, self.poison)
        (self.launch.traced if traced else self.launch)(qkv, ws)
        (self.merge.traced if traced else self.merge)(ws, cv)
        return cv


def context_plan(qkv: torch.Tensor, d: int, H: int, W: int, q_col: int = 0, k_col: int = 1,
                 blocks: Optional[Tuple[int, int]] = None, split: Optional[int] = None) -> ContextPlan:
    """The launch for a qkv [B*H*W, C] (column stride 1) like this one (metadata only). ``split`` (else
    ``FASTMVIT_SPLIT``) forces a split over tokens; otherwise ``split_rule`` decides."""
    B = qkv.shape[0] // (H * W)
    n_tok = (H // 2) * (W // 2)
    BT, BD = blocks or _blocks(d, n_tok)
    if split is None:
        split = split_override()
    if split is not None and split > 1 and blocks is None and interpreting():
        BT = max(4, triton.next_power_of_2(triton.cdiv(n_tok, split)))  # one interpreter chunk per split
    grid = (B * 4, triton.cdiv(d, BD))
    scalars = (qkv.stride(0), q_col, k_col, d, H, W)
    ctas = grid[0] * grid[1]
    # partials per split: B*4 contexts of d floats and a (max, sum) pair per program
    decision = split_rule(ctas, triton.cdiv(n_tok, BT), STEP_GEMM, sm_count(qkv.device),
                          partial_bytes=4 * (B * 4 * d + 2 * ctas), merge_ctas=ctas, force=split, kernel="sepattn")
    if decision.n == 1:
        return ContextPlan(Launch(context_kernel, grid, scalars, BT=BT, BD=BD, SPLIT=False, num_warps=4,
                                  num_stages=3), (B, 4, d), qkv.device, poisoning(), decision=decision)
    S = decision.n
    main = Launch(context_kernel, (*grid, S), scalars, BT=BT, BD=BD, SPLIT=True, num_warps=4, num_stages=3)
    merge = Launch(context_merge_kernel, grid, (d, S), BD=BD, num_warps=4, num_stages=1)
    return ContextPlan(main, (B, 4, d), qkv.device, poisoning(), merge, (S * (B * 4 * d + 2 * ctas),), decision)


def context(qkv: torch.Tensor, d: int, H: int, W: int, q_col: int = 0, k_col: int = 1,
            blocks: Optional[Tuple[int, int]] = None, split: Optional[int] = None) -> torch.Tensor:
    """qkv [B*H*W, C] (column stride 1) -> cv [B, 4, d] float32 (launched traceably); arguments checked
    by the ops layer. blocks: (BT, BD) to override the launch rule (tests); split: see ``context_plan``."""
    return context_plan(qkv, d, H, W, q_col, k_col, blocks, split)(qkv, traced=True)


def compile_configs() -> List[CompileConfig]:
    """Per activation dtype: the padded k | v | q layout of ``pack_qkv`` (row stride, k_col and the
    output 16-divisible) and the checkpoints' q | k | v layout (row stride 2d + 1, k_col = 1); the token
    split (the rule picks it for large maps, ``FASTMVIT_SPLIT`` forces it) in the packed layout, and its
    merge (float32 in and out: one specialisation)."""
    out = []
    for name in TRITON_DTYPE.values():
        sig = {"qkv_ptr": f"*{name}", "cv_ptr": "*fp32", "stride_m": "i32", "q_col": "i32", "k_col": "i32",
               "D": "i32", "H": "i32", "W": "i32", "BT": "constexpr", "BD": "constexpr", "SPLIT": "constexpr"}
        for div16, tag in ((("qkv_ptr", "cv_ptr", "stride_m", "k_col", "D"), "packed"), (("qkv_ptr", "cv_ptr"), "qkv")):
            out.append(CompileConfig(f"sepattn_context-{name}-{tag}", context_kernel, sig,
                                     {"BT": 64, "BD": 64, "SPLIT": False}, 4, 3, aligned=div16))
        out.append(CompileConfig(f"sepattn_context-{name}-packed-split", context_kernel, sig,
                                 {"BT": 64, "BD": 64, "SPLIT": True}, 4, 3,
                                 aligned=("qkv_ptr", "cv_ptr", "stride_m", "k_col", "D")))
    out.append(CompileConfig("sepattn_context_merge", context_merge_kernel,
                             {"ws_ptr": "*fp32", "cv_ptr": "*fp32", "D": "i32", "SPLIT": "i32", "BD": "constexpr"},
                             {"BD": 64}, 4, 1, aligned=("ws_ptr", "cv_ptr", "D")))
    return out
