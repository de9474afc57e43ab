"""Tiled GEMM on the NHWC token matrix with fused prologues and epilogues: every 1x1 convolution and
linear layer of MobileViT v1/v2.

    y[M, N] = epilogue(prologue(A)[M, K] @ W[K, N])

A is a 2-D view with column stride 1 and any row stride (a column slice of a wider buffer is read in
place). W is the packed weight ``[K, N_pad]`` (``fastmvit.ops.gemm.pack_linear``), with every BatchNorm
and the LayerNorm / GroupNorm affine already folded in. Accumulation is fp32; tl.dot runs in IEEE fp32
for float32 operands (TF32 would miss float32 parity by ~1e-3) and on tensor cores for fp16/bf16.

Prologues (constexpr NORM / RELU_SCALE), applied in fp32 to each A tile before it is cast back to the
operand dtype for tl.dot:
  NORM=1  LayerNorm over the K channels of each row. Row statistics come from a first pass over the row
          (per-chunk mean and M2 merged with Chan's formula), then the A tile is normalised in the main
          loop. Chosen over y = rstd*(A@W'^T - mean*colsum(W')) + b' because the algebraic form cancels
          catastrophically when |mean| >> std (residual streams): in float32 it exceeds twice PyTorch's
          own error from mean/std ~ 10 on (3.6x at 10, 3.7x at 100), while the two-pass form stays
          within 1.4x; in fp16 both are within bounds.
  NORM=2  GroupNorm(1): per-sample mean/rstd over all rows_per_sample*K elements, reduced here from the
          partial statistics that the producing GEMM emitted (EMIT_STATS): a [B, 3, T] float32 tensor of
          (count, mean, M2) per output tile, merged with Chan's formula in a fixed order (deterministic).
  RELU_SCALE  A'[m, k] = relu(A[m, k]) * cv[b, p(m), k]: MobileViTv2's separable attention before out_proj,
          with cv [B, 4, K] float32 from sepattn_context, b = m // (H*W), p = (h % 2) * 2 + (w % 2).

Launch classes (``pick_config``): fixed rules, few tile shapes, each compiled for sm_90 without spills
by Triton 3.6 and 3.9. Whether A, the residual and y have 16-byte aligned rows decides the class: aligned
rows load as 16-byte vectors through a cp.async shared-memory pipeline (A_VEC also lets the K tail load
whole 8-element groups); unaligned rows (row strides such as 24, 120 or v2's 2d + 1) load element by
element, which only a 64x64x32 tile affords. Addresses are a 64-bit tile base plus int32 in-tile
offsets; W is masked at its padded width, so its loads are vectorised whatever N is. Divisions and
square roots use the approximate (2 ulp) PTX forms: the IEEE ones call a slow-path subroutine whose
stack frame shows up as STACK in the compile check.

Epilogue, in this order: + bias[N] (fp32); SiLU; + residual[M, N]; then either the store of y (and, with
EMIT_STATS, the tile's (count, mean, M2) of the values as stored, i.e. after rounding to the output
dtype), or with POOL the per-sample mean over rows, [B, N] float32, y never written.

EMIT_STATS and POOL use sample-aligned row tiles (a tile never straddles two samples): program
(b, t, n) covers rows b*rps + t*BM ... of sample b. POOL programs loop over every row tile of their sample
and keep the column sums in registers: no atomics, deterministic.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import (STEP_GEMM, TRITON_DTYPE, CompileConfig, Launch, empty_output, interpreting, poisoning, sm_count,
                      split_rule, target_arch)

__all__ = ["GemmConfig", "pick_config", "is_aligned", "gemm",
           "compile_configs"]

NORM_NONE, NORM_LAYER, NORM_GROUP = 0, 1, 2
STATS_BLOCK = tl.constexpr(64)  # partial-statistics slots merged per step by the GroupNorm prologue


@triton.jit
def _chan_combine(mean_a, m2_a, n_a, mean_b, m2_b, n_b):
    """Merge two (mean, M2, count) summaries (Chan et al.); empty summaries (count 0) are identities."""
    n = n_a + n_b
    frac = tl.where(n == 0, 0.0, tl.fdiv(n_b, tl.where(n == 0, 1.0, n)))
    delta = mean_b - mean_a
    return mean_a + delta * frac, m2_a + m2_b + delta * delta * n_a * frac, n


@triton.jit
def _vec_bound(n, A_VEC: tl.constexpr):
    """Column bound for loads along a row: with A_VEC (16-byte aligned rows, row stride a multiple of 16)
    rounded up to whole 8-element groups, which stay inside the row, so the loads remain vectorised;
    the columns past n are then zeroed with an exact mask. Otherwise n itself."""
    if A_VEC:
        return tl.multiple_of((n + 7) // 8 * 8, 8)
    return n


@triton.jit
def _layernorm_rows(a_base, lrows, row_ok, K, stride_am, eps, BM: tl.constexpr, BK: tl.constexpr,
                    A_VEC: tl.constexpr):
    """Mean and rstd [BM] of each row's K values: per-chunk two-pass summaries merged with Chan."""
    mean = tl.zeros([BM], dtype=tl.float32)
    m2 = tl.zeros([BM], dtype=tl.float32)
    k_load = _vec_bound(K, A_VEC)
    for k0 in range(0, K, BK):
        offs_k = k0 + tl.arange(0, BK)
        mask = row_ok[:, None] & (offs_k < K)[None, :]
        a = tl.load(a_base + (lrows[:, None] * stride_am + offs_k[None, :]),
                    mask=row_ok[:, None] & (offs_k < k_load)[None, :], other=0.0)
        a = tl.where(mask, a.to(tl.float32), 0.0)
        n_a = k0 * 1.0
        n_b = tl.minimum(K - k0, BK) * 1.0
        c_mean = tl.fdiv(tl.sum(a, axis=1), n_b)
        dev = tl.where(mask, a - c_mean[:, None], 0.0)
        c_m2 = tl.sum(dev * dev, axis=1)
        delta = c_mean - mean
        frac = tl.fdiv(n_b, n_a + n_b)
        mean = mean + delta * frac
        m2 = m2 + c_m2 + delta * delta * n_a * frac
    return mean, tl.rsqrt(tl.fdiv(m2, K * 1.0) + eps)


@triton.jit
def _groupnorm_rows(stats_ptr, b_first, r_first, lrows, row_ok, n_rows, rps, T, eps,
                    BM: tl.constexpr, SB: tl.constexpr):
    """Mean and rstd [BM] of the sample each row belongs to, from the [B, 3, T] partials. The tile's
    first row is row r_first of sample b_first."""
    b_row = (r_first + lrows) // rps  # relative to b_first
    mean_rows = tl.zeros([BM], dtype=tl.float32)
    rstd_rows = tl.zeros([BM], dtype=tl.float32)
    for j in range(0, (r_first + n_rows - 1) // rps + 1):
        base = stats_ptr + (b_first + j) * 3 * T
        mean = 0.0
        m2 = 0.0
        n = 0.0
        for t0 in range(0, T, SB):
            t = t0 + tl.arange(0, SB)
            ok = t < T
            c_n = tl.load(base + t, mask=ok, other=0.0)
            c_mean = tl.load(base + T + t, mask=ok, other=0.0)
            c_m2 = tl.load(base + 2 * T + t, mask=ok, other=0.0)
            # The chunk's summary in closed form (two passes over its slots: the pooled mean, then M2 as
            # the slots' own M2 plus their means' spread around it), all plain sums, where a tl.reduce
            # with a Chan combine took 2-8 more registers on sm_90 and, under the interpreter (which runs
            # a custom combine one element at a time in Python), 40% of a v2 forward. Empty slots (n 0)
            # add nothing.
            s_n = tl.sum(c_n, axis=0)
            s_mean = tl.fdiv(tl.sum(c_n * c_mean, axis=0), tl.maximum(s_n, 1.0))
            dev = c_mean - s_mean
            s_m2 = tl.sum(c_m2, axis=0) + tl.sum(c_n * dev * dev, axis=0)
            mean, m2, n = _chan_combine(mean, m2, n, s_mean, s_m2, s_n)
        rstd = tl.rsqrt(tl.fdiv(m2, n) + eps)
        hit = row_ok & (b_row == j)
        mean_rows = tl.where(hit, mean, mean_rows)
        rstd_rows = tl.where(hit, rstd, rstd_rows)
    return mean_rows, rstd_rows


@triton.jit
def _mma_step(acc, a_ptrs, w_ptrs, row_ok, a_cols, k_ok, w_mask, cv_ptrs, mean, rstd,
              NORM: tl.constexpr, RELU_SCALE: tl.constexpr, TAIL: tl.constexpr, PRECISION: tl.constexpr):
    """acc += prologue(A tile) @ W tile. Full steps (TAIL=False) load A unmasked in K, so that with no
    prologue A streams from shared memory straight into the MMA. The tail step loads the columns
    a_cols (k_ok rounded up to vector groups, or k_ok itself) and zeroes those past K."""
    if TAIL:
        a = tl.load(a_ptrs, mask=row_ok[:, None] & a_cols[None, :], other=0.0)
        a = tl.where(k_ok[None, :], a, 0.0)
    else:
        a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
    if NORM != 0:
        a = (a.to(tl.float32) - mean[:, None]) * rstd[:, None]
        if TAIL:
            a = tl.where(k_ok[None, :], a, 0.0)
        a = a.to(w_ptrs.dtype.element_ty)
    if RELU_SCALE:
        cv_mask = row_ok[:, None] & k_ok[None, :] if TAIL else row_ok[:, None]
        cv = tl.load(cv_ptrs, mask=cv_mask, other=0.0)
        a = (tl.maximum(a.to(tl.float32), 0.0) * cv).to(w_ptrs.dtype.element_ty)
    w = tl.load(w_ptrs, mask=w_mask, other=0.0)
    return tl.dot(a, w, acc, input_precision=PRECISION)


@triton.jit
def _mma(a_base, w_ptr, cv_ptr, r0, lrows, row_ok, offs_n, K, stride_am, stride_wk, hw, img_w,
         mean, rstd, NORM: tl.constexpr, RELU_SCALE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
         BK: tl.constexpr, PRECISION: tl.constexpr, A_VEC: tl.constexpr):
    """acc[BM, BN] = prologue(A[r0 + lrows, :]) @ W[:, offs_n], fp32 (a_base points at row r0).

    Addresses are a 64-bit tile base plus int32 in-tile offsets: where Triton cannot prove 16-byte
    alignment (row strides such as 24, 120 or v2's 2d+1) every element needs its own address, and
    int32 offsets halve the registers they take. The full BK steps carry no K mask, so Triton can
    stream them through shared memory with async copies; the K tail is one masked step. W's columns
    are masked at N_pad = stride_wk (16-divisible; the padding is zeros) rather than at N, so its loads
    stay vectorised whatever N is."""
    offs_k = tl.arange(0, BK)
    a_ptrs = a_base + (lrows[:, None] * stride_am + offs_k[None, :])
    w_ptrs = w_ptr + (offs_k[:, None] * stride_wk + offs_n[None, :])
    cv_ptrs = cv_ptr
    if RELU_SCALE:
        b0 = r0 // hw
        q = (r0 - b0 * hw) + lrows
        pix = q % hw
        part = ((pix // img_w) % 2) * 2 + (pix % img_w) % 2
        cv_ptrs = cv_ptr + b0.to(tl.int64) * 4 * K + (((q // hw) * 4 + part)[:, None] * K + offs_k[None, :])
    w_cols = offs_n < stride_wk
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    k_full = K - K % BK
    for k0 in range(0, k_full, BK):
        acc = _mma_step(acc, a_ptrs + k0, w_ptrs + k0 * stride_wk, row_ok, w_cols, w_cols, w_cols[None, :],
                        cv_ptrs + k0, mean, rstd, NORM, RELU_SCALE, False, PRECISION)
    if k_full < K:
        k_ok = offs_k < K - k_full
        a_cols = offs_k < _vec_bound(K - k_full, A_VEC)
        acc = _mma_step(acc, a_ptrs + k_full, w_ptrs + k_full * stride_wk, row_ok, a_cols, k_ok,
                        k_ok[:, None] & w_cols[None, :], cv_ptrs + k_full, mean, rstd,
                        NORM, RELU_SCALE, True, PRECISION)
    return acc


@triton.jit
def _epilogue(acc, bias_ptr, res_base, lrows, row_ok, offs_n, n_ok, stride_rm,
              HAS_BIAS: tl.constexpr, ACT: tl.constexpr, HAS_RES: tl.constexpr):
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
    if ACT:
        acc = acc * tl.sigmoid(acc)
    if HAS_RES:
        r = tl.load(res_base + (lrows[:, None] * stride_rm + offs_n[None, :]),
                    mask=row_ok[:, None] & n_ok[None, :], other=0.0)
        acc += r.to(tl.float32)
    return acc


@triton.jit
def gemm_kernel(
    a_ptr, w_ptr, bias_ptr, res_ptr, out_ptr, stats_in_ptr, cv_ptr, stats_out_ptr,
    M, N, K, stride_am, stride_wk, stride_rm, stride_om,
    rps, n_slots_in, hw, img_w, tiles_per_sample, eps,
    NORM: tl.constexpr, RELU_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
    HAS_RES: tl.constexpr, EMIT_STATS: tl.constexpr, POOL: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr, A_VEC: tl.constexpr,
    PAD_STORE: tl.constexpr,
):
    """One program per (row tile, column tile); see the module docstring. Grid: POOL -> B * tiles_n;
    EMIT_STATS -> B * tiles_per_sample * tiles_n; otherwise cdiv(M, BM) * tiles_n (column tiles of one
    row tile are neighbours, so the A tile is fetched from DRAM once and W (<= 2 MiB) stays in L2)."""
    tiles_n = tl.cdiv(N, BN)
    pid = tl.program_id(0)
    pid_m = pid // tiles_n
    pid_n = pid % tiles_n
    offs_n = pid_n * BN + tl.arange(0, BN)
    n_ok = offs_n < N
    lrows = tl.arange(0, BM)
    if POOL:
        b = pid_m
        t_first = 0
        t_last = tiles_per_sample
    elif EMIT_STATS:
        b = pid_m // tiles_per_sample
        t_first = pid_m % tiles_per_sample
        t_last = t_first + 1
    else:
        b = 0
        t_first = pid_m
        t_last = pid_m + 1
    col_sum = tl.zeros([BN], dtype=tl.float32)
    for t in range(t_first, t_last):
        # Row indices fit in int32 (M is); only addresses are widened (64-bit division is a subroutine).
        if POOL or EMIT_STATS:  # sample-aligned row tiles
            r0 = b * rps + t * BM
            n_rows = tl.minimum(rps - t * BM, BM)
        else:
            r0 = pid_m * BM  # t == pid_m
            n_rows = tl.minimum(M - r0, BM)
        row0 = r0.to(tl.int64)
        row_ok = lrows < n_rows
        a_base = a_ptr + row0 * stride_am
        if NORM == 1:
            mean, rstd = _layernorm_rows(a_base, lrows, row_ok, K, stride_am, eps, BM, BK, A_VEC)
        elif NORM == 2:
            b_first = r0 // rps
            mean, rstd = _groupnorm_rows(stats_in_ptr, b_first.to(tl.int64), r0 - b_first * rps, lrows,
                                         row_ok, n_rows, rps, n_slots_in, eps, BM, STATS_BLOCK)
        else:
            mean = tl.zeros([BM], dtype=tl.float32)
            rstd = mean
        acc = _mma(a_base, w_ptr, cv_ptr, r0, lrows, row_ok, offs_n, K, stride_am, stride_wk, hw, img_w,
                   mean, rstd, NORM, RELU_SCALE, BM, BN, BK, PRECISION, A_VEC)
        acc = _epilogue(acc, bias_ptr, res_ptr + row0 * stride_rm, lrows, row_ok, offs_n, n_ok, stride_rm,
                        HAS_BIAS, ACT, HAS_RES)
        ok = row_ok[:, None] & n_ok[None, :]
        if POOL:
            col_sum += tl.sum(tl.where(ok, acc, 0.0), axis=0)
        else:
            y = acc.to(out_ptr.dtype.element_ty)
            # PAD_STORE: y's rows are padded to stride_om (a multiple of 16; W's padding columns are zero, so
            # are the values there): masking at the row stride keeps whole 16-byte vectors (v2's qkv, N = 2d+1)
            st_ok = ok
            if PAD_STORE:
                st_ok = row_ok[:, None] & (offs_n < stride_om)[None, :]
            tl.store(out_ptr + row0 * stride_om + (lrows[:, None] * stride_om + offs_n[None, :]), y, mask=st_ok)
            if EMIT_STATS:
                # Statistics of the values as stored, so the consumer normalises exactly what it reads.
                yf = tl.where(ok, y.to(tl.float32), 0.0)
                count = n_rows * tl.minimum(N - pid_n * BN, BN) * 1.0
                t_mean = tl.fdiv(tl.sum(tl.sum(yf, axis=1), axis=0), count)
                dev = tl.where(ok, yf - t_mean, 0.0)
                t_m2 = tl.sum(tl.sum(dev * dev, axis=1), axis=0)
                n_slots = tiles_per_sample * tiles_n
                slot = stats_out_ptr + b.to(tl.int64) * 3 * n_slots + (t * tiles_n + pid_n)
                tl.store(slot, count)
                tl.store(slot + n_slots, t_mean)
                tl.store(slot + 2 * n_slots, t_m2)
    if POOL:
        tl.store(out_ptr + b.to(tl.int64) * N + offs_n, tl.fdiv(col_sum, rps * 1.0), mask=n_ok)


class GemmConfig(NamedTuple):
    BM: int
    BN: int
    BK: int
    num_warps: int
    num_stages: int


# Arguments Triton specialises as 16-divisible in an aligned launch (W is always: pack_linear pads it).
ALIGNED_ARGS = ("a_ptr", "w_ptr", "res_ptr", "out_ptr", "stride_am", "stride_wk", "stride_rm", "stride_om")
W_ARGS = ("w_ptr", "stride_wk")

def _pow2(x: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(x), 1))))


def pick_config(M: int, N: int, K: int, dtype: torch.dtype, *, rows: Optional[int] = None,
                norm: bool = False, relu_scale: bool = False, pool: bool = False, aligned: bool = True,
                sms: int = 132, interpret: Optional[bool] = None, arch: int = 90) -> GemmConfig:
    """Fixed launch rules per shape class: ``_sm90_config``'s, adjusted below sm_90 (``arch``) where a
    tile spills there (``_below_sm90``). See ``_sm90_config`` for the arguments."""
    if interpreting() if interpret is None else interpret:
        # The interpreter's cost grows with the number of programs, not their size.
        return GemmConfig(_pow2(rows or M, 16, 512), _pow2(N, 16, 512), _pow2(K, 16, 256), 4, 1)
    cfg = _sm90_config(M, N, K, dtype, rows=rows, norm=norm, relu_scale=relu_scale, pool=pool, aligned=aligned,
                       sms=sms)
    return cfg if arch >= 90 else _below_sm90(cfg, dtype, stats=rows is not None and not pool, pool=pool)


def _below_sm90(cfg: GemmConfig, dtype: torch.dtype, *, stats: bool, pool: bool) -> GemmConfig:
    """sm_80/86/89 (mma.sync: every warp holds its accumulators and operand fragments in registers, no
    warpgroup MMA): the sm_90 tiles that spill there under triton 3.6 get smaller per-thread shares.
    fp32 64x64x32 (96 registers + 8 bytes of stack) takes 32 rows (83); a 16-bit 64x64x64 tile that
    emits GroupNorm statistics (bf16: 128 + 8 bytes of stack) takes 8 warps (80)."""
    if dtype == torch.float32 and not pool and cfg.BM == 64:
        return cfg._replace(BM=32)
    if dtype != torch.float32 and stats and cfg == GemmConfig(64, 64, 64, 4, 3):
        return cfg._replace(num_warps=8)
    return cfg


def _sm90_config(M: int, N: int, K: int, dtype: torch.dtype, *, rows: Optional[int] = None,
                 norm: bool = False, relu_scale: bool = False, pool: bool = False, aligned: bool = True,
                 sms: int = 132) -> GemmConfig:
    """Fixed launch rules per shape class (designed for sm_90 and checked there for spills, not timed).

    rows: rows per sample when tiles are sample-aligned (EMIT_STATS / POOL); norm (LN / GN) and
    relu_scale: the prologues (the A tile goes through registers); aligned: A, residual and output rows 16-byte aligned
    (``is_aligned``), which lets Triton vectorise and pipeline the loads through shared memory.
    Fixed rules rather than an autotuner: the partial-statistics layout [B, 3, T] must be known when the
    output is allocated (T depends on BM and BN), and CUDA-graph capture must never tune. The tile
    classes are few on purpose (each is one JIT compile at warm-up) and each compiles without spills
    for sm_90, aligned or not, with every flag combination (``compile_configs``).
    """
    if dtype == torch.float32:  # IEEE fp32 dot runs on FMA units
        if pool:  # other tiles let ptxas park a few long-lived values on the stack (sm_80 or sm_90)
            return GemmConfig(32, 64, 32, 8, 2) if aligned else GemmConfig(32, 32, 32, 4, 2)
        return GemmConfig(32 if (norm or not aligned) else 64, 64, 32, 4, 2)
    if not aligned:  # scalar loads, one address each: the tile that never spills
        return GemmConfig(64, 64, 32, 8 if (pool or relu_scale) else 4, 3)
    if pool:  # the loop over the sample's row tiles keeps more alive: two warpgroups
        return GemmConfig(64, 64, 64, 8, 3)
    if N <= 64 or relu_scale:  # relu-scale's fp32 cv tile is pipelined too: no room for larger tiles
        return GemmConfig(64, 64, 64, 4, 3)

    def tiles(bm, bn):
        return ((M // rows) * triton.cdiv(rows, bm) if rows else triton.cdiv(M, bm)) * triton.cdiv(N, bn)

    if tiles(128, 128) >= sms:
        return GemmConfig(128, 128, 64, 8, 3)
    if tiles(64, 128) >= sms or norm:  # batch 1: fill the SMs before growing the tile
        return GemmConfig(64, 128, 64, 4, 3)
    return GemmConfig(64, 64, 64, 4, 3)


def is_aligned(*tensors) -> bool:
    """True when Triton will specialise every given 2-D row view as 16-divisible (data pointer 16-byte
    aligned, row stride a multiple of 16 elements), i.e. when the aligned tile classes apply.

    Decided from the view's offset, not its address, so that fake tensors (torch.compile, export) infer
    the same launch, and with it the same [B, 3, T] statistics shape: PyTorch's allocators align every
    storage to at least 64 bytes. A storage that is not (an external buffer) only costs speed."""
    return all(t is None or ((t.storage_offset() * t.element_size()) % 16 == 0 and t.stride(0) % 16 == 0)
               for t in tensors)


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


class GemmPlan:
    """``gemm`` resolved for one signature (shapes, strides, alignment, flags): tile configuration,
    grid, scalar arguments and output shapes, fixed. ``plan(a, w, bias, residual, group_stats,
    relu_scale)`` allocates the outputs and launches; nothing else runs per call."""

    __slots__ = ("launch", "out_shape", "n_out", "padded", "out_dtype", "stats_shape", "device", "poison")

    def __init__(self, launch_, out_shape, n_out, padded, out_dtype, stats_shape, device, poison):
        self.launch, self.out_shape, self.n_out, self.padded = launch_, out_shape, n_out, padded
        self.out_dtype, self.stats_shape, self.device, self.poison = out_dtype, stats_shape, device, poison

    def __call__(self, a, w, bias, residual, group_stats, relu_scale, traced: bool = False):
        out = empty_output(self.out_shape, self.out_dtype, self.device, self.poison, traced)
        if self.padded:
            out = out[:, :self.n_out]
        stats = None if self.stats_shape is None else \
            empty_output(self.stats_shape, torch.float32, self.device, self.poison, traced)
        (self.launch.traced if traced else self.launch)(
            a, w, out if bias is None else bias, out if residual is None else residual, out,
            out if group_stats is None else group_stats, out if relu_scale is None else relu_scale,
            out if stats is None else stats)
        return out if stats is None else (out, stats)


def gemm_plan(a: torch.Tensor, w: torch.Tensor, n_out: int, *, has_bias: bool = False, act: bool = False,
              residual: Optional[torch.Tensor] = None, norm: int = NORM_NONE,
              group_stats: Optional[torch.Tensor] = None, rows_per_sample: int = 0, has_relu_scale: bool = False,
              hw: tuple = (0, 0), emit_stats: bool = False, pool: bool = False, eps: float = 1e-5,
              out_stride: int = 0, config: Optional[GemmConfig] = None,
              poison: Optional[bool] = None) -> GemmPlan:
    """Resolve ``gemm`` for tensors shaped, strided and placed like these (only their metadata is read)."""
    M, K = a.shape
    N = n_out
    B = M // rows_per_sample if rows_per_sample else 1
    aligned_rows = emit_stats or pool
    row_stride = N if pool else max(out_stride, N)  # y is allocated fresh: offset 0, this row stride
    cfg = config or pick_config(M, N, K, a.dtype, rows=rows_per_sample if aligned_rows else None,
                                norm=norm != NORM_NONE, relu_scale=has_relu_scale, pool=pool,
                                aligned=is_aligned(a, residual) and (pool or row_stride % 16 == 0),
                                sms=sm_count(a.device), arch=target_arch(a.device))
    tiles_n = triton.cdiv(N, cfg.BN)
    tps = triton.cdiv(rows_per_sample, cfg.BM) if aligned_rows else 0
    if pool:
        grid = (B * tiles_n,)
        # Never split (judged by the split rule, logged for ``info --plan``, max_split=1). K cannot be split:
        # SiLU comes between the K sum and the pooling. Only the sample's row tiles could be, and at the
        # released sizes there is nothing to win: S at batch 1, 256^2 is 10 CTAs x 3 steps, ~0.3 us by the
        # rule, while any split adds a merge launch (LAUNCH_COST 2.5 us) alone worth 8x that. The rule
        # would pay only from ~33 serial steps on one wave: 11 row tiles of 64 pixels at K = 160, a final
        # map of ~700 pixels (inputs from ~850^2), which no released use reaches.
        split_rule(grid[0], triton.cdiv(K, cfg.BK) * tps, STEP_GEMM, sm_count(a.device), partial_bytes=4 * B * N,
                   merge_ctas=grid[0], max_split=1, kernel="gemm pool")
    else:
        grid = ((B * tps if emit_stats else triton.cdiv(M, cfg.BM)) * tiles_n,)
    H, W = hw
    scalars = (M, N, K, a.stride(0), w.stride(0), residual.stride(0) if residual is not None else 0, row_stride,
               rows_per_sample, group_stats.shape[2] if group_stats is not None else 0, H * W, W, tps, eps)
    kernel_launch = Launch(
        gemm_kernel, grid, scalars,
        NORM=norm, RELU_SCALE=has_relu_scale, HAS_BIAS=has_bias, ACT=act,
        HAS_RES=residual is not None, EMIT_STATS=emit_stats, POOL=pool,
        BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, PRECISION=_precision(a.dtype), A_VEC=is_aligned(a),
        PAD_STORE=not (pool or emit_stats) and row_stride != N,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return GemmPlan(kernel_launch, (B, N) if pool else (M, row_stride), N, not pool and row_stride != N,
                    torch.float32 if pool else a.dtype, (B, 3, tps * tiles_n) if emit_stats else None, a.device,
                    poisoning() if poison is None else poison)


def gemm(a: torch.Tensor, w: torch.Tensor, n_out: int, *, bias: Optional[torch.Tensor] = None,
         act: bool = False, residual: Optional[torch.Tensor] = None, norm: int = NORM_NONE,
         group_stats: Optional[torch.Tensor] = None, rows_per_sample: int = 0,
         relu_scale: Optional[torch.Tensor] = None, hw: tuple = (0, 0), emit_stats: bool = False,
         pool: bool = False, eps: float = 1e-5, out_stride: int = 0, config: Optional[GemmConfig] = None):
    """Launch ``gemm_kernel`` (traceably: ``wrap_triton``); arguments are validated by
    ``fastmvit.ops.gemm.linear``.

    a [M, K] (column stride 1), w [K, N_pad] packed, bias [N] float32, residual [M, n_out] (column
    stride 1), group_stats [B, 3, T] float32, relu_scale [B, 4, K] float32, hw = (H, W) of the map for
    relu_scale, out_stride: row stride of y (>= n_out; 0: n_out). Returns y [M, n_out] in a's dtype (a
    view of [M, out_stride] storage); with emit_stats (y, stats [B, 3, T]); with pool [B, n_out] float32.
    """
    plan = gemm_plan(a, w, n_out, has_bias=bias is not None, act=act, residual=residual, norm=norm,
                     group_stats=group_stats, rows_per_sample=rows_per_sample,
                     has_relu_scale=relu_scale is not None, hw=hw, emit_stats=emit_stats, pool=pool, eps=eps,
                     out_stride=out_stride, config=config)
    return plan(a, w, bias, residual, group_stats, relu_scale, traced=True)


# -- ahead-of-time compile check -------------------------------------------------------------------------

def engine_calls(variant, batch: int, size: int = 256):
    """Every GEMM the engine launches for one forward of ``variant`` (a fastmvit.variants.Variant) at
    size x size: dicts of M, N, K, rows (rows per sample) and the kernel's flags. The 1x1 convolutions of
    the inverted residuals are listed too, for when the engine does not fuse them into the conv kernels."""
    from fastmvit.variants import make_divisible

    calls = []

    def add(hw, n, k, **flags):
        calls.append(dict(M=batch * hw, N=n, K=k, rows=hw, **flags))

    side = size // 2  # after the stride-2 stem
    ch = variant.stem_channels
    for stage in variant.stages:
        for i in range(stage.num_ir):
            stride = stage.stride if i == 0 else 1
            hidden = make_divisible(int(round(ch * stage.expand)), 8)
            add(side * side, hidden, ch, bias=True, act=True)
            side = -(-side // stride)
            add(side * side, stage.out_channels, hidden, bias=True,
                res=stride == 1 and ch == stage.out_channels)
            ch = stage.out_channels
        t = stage.transformer
        if t is None:
            continue
        hw, d = side * side, t.dim
        add(hw, d, ch)                                                   # conv_1x1 (no bias)
        if variant.family == "v1":
            for _ in range(t.depth):
                add(hw, 3 * d, d, bias=True, norm=NORM_LAYER)            # LN1 -> qkv
                add(hw, d, d, bias=True, res=True)                       # attention proj + residual
                add(hw, t.ffn_dim, d, bias=True, act=True, norm=NORM_LAYER)
                add(hw, d, t.ffn_dim, bias=True, res=True)
            add(hw, ch, d, bias=True, act=True, norm=NORM_LAYER)         # final LN -> conv_proj (BN, SiLU)
        else:
            calls[-1]["stats"] = True
            for _ in range(t.depth):
                add(hw, 1 + 2 * d, d, bias=True, norm=NORM_GROUP, qkv=True)  # GN1 -> qkv (padded rows)
                add(hw, d, d, bias=True, res=True, relu_scale=True, stats=True)  # A: v of the qkv
                add(hw, t.ffn_dim, d, bias=True, act=True, norm=NORM_GROUP)
                add(hw, d, t.ffn_dim, bias=True, res=True, stats=True)
            last = stage is variant.stages[-1]
            add(hw, ch, d, bias=True, norm=NORM_GROUP, pool=last)        # final GN -> conv_proj (BN)
    if variant.final_conv_channels:
        add(side * side, variant.final_conv_channels, ch, bias=True, act=True, pool=True)
    return calls


def _signature(name: str) -> dict:
    sig = {"a_ptr": f"*{name}", "w_ptr": f"*{name}", "bias_ptr": "*fp32", "res_ptr": f"*{name}",
           "out_ptr": f"*{name}", "stats_in_ptr": "*fp32", "cv_ptr": "*fp32", "stats_out_ptr": "*fp32"}
    sig.update({k: "i32" for k in ("M", "N", "K", "stride_am", "stride_wk", "stride_rm", "stride_om", "rps",
                                   "n_slots_in", "hw", "img_w", "tiles_per_sample")})
    sig["eps"] = "fp32"
    sig.update({k: "constexpr" for k in ("NORM", "RELU_SCALE", "HAS_BIAS", "ACT", "HAS_RES", "EMIT_STATS",
                                         "POOL", "BM", "BN", "BK", "PRECISION", "A_VEC", "PAD_STORE")})
    return sig


def _call_alignment(c) -> Tuple[str, ...]:
    """The arguments an engine call passes 16-divisible: W and the fresh fp32 buffers always; A when its
    row stride is (v2's out_proj reads the v columns of the padded [k | v | q] qkv: stride and offset are
    multiples of 16 when d is); y and the residual when N is (v2's qkv rows are padded to 16)."""
    args = list(W_ARGS) + ["bias_ptr", "stats_in_ptr", "cv_ptr", "stats_out_ptr"]
    if c.get("unaligned"):
        return tuple(args)
    if c["K"] % 16 == 0:
        args += ["a_ptr", "stride_am", "K"]
    if c["N"] % 16 == 0 or c.get("qkv"):
        args += ["out_ptr", "stride_om", "res_ptr", "stride_rm"]
    if c["N"] % 16 == 0:
        args += ["N"]
    return tuple(args)


def compile_configs(batches=(1, 8, 64, 256), size: int = 256, arch: int = 90) -> List[CompileConfig]:
    """Every specialisation of ``gemm_kernel`` the engine launches for the released variants at
    size x size and the given batch sizes, in the three dtypes (deduplicated), each with the arguments
    Triton will see as 16-divisible (``CompileConfig.aligned``); and, for every flag
    combination, the unaligned fallback tile with nothing but W aligned, which other channel counts
    or strided inputs reach. ``arch``: the launch rules of sm_<arch> (an A100's 108 SMs below sm_90)."""
    from fastmvit.variants import VARIANTS

    seen = {}
    for dtype, name in TRITON_DTYPE.items():
        for variant in VARIANTS.values():
            for batch in batches:
                calls = engine_calls(variant, batch, size)
                for c in calls + [dict(c, unaligned=True) for c in calls]:
                    div16 = _call_alignment(c)
                    aligned = {"a_ptr", "out_ptr"} <= set(div16)
                    rows = c["rows"] if c.get("stats") or c.get("pool") else None
                    cfg = pick_config(c["M"], c["N"], c["K"], dtype, rows=rows, pool=c.get("pool", False),
                                      norm=bool(c.get("norm")), relu_scale=c.get("relu_scale", False),
                                      aligned=aligned, sms=132 if arch >= 90 else 108, arch=arch)
                    cons = dict(NORM=c.get("norm", NORM_NONE), RELU_SCALE=c.get("relu_scale", False),
                                HAS_BIAS=c.get("bias", False), ACT=c.get("act", False), HAS_RES=c.get("res", False),
                                EMIT_STATS=c.get("stats", False), POOL=c.get("pool", False),
                                BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, PRECISION=_precision(dtype),
                                A_VEC="a_ptr" in div16, PAD_STORE=bool(c.get("qkv")) and not c.get("stats"))
                    key = (name, tuple(sorted(cons.items())), cfg.num_warps, cfg.num_stages, div16)
                    if key in seen:
                        continue
                    flags = [{1: "ln", 2: "gn"}.get(cons["NORM"])] + [
                        tag for k, tag in (("RELU_SCALE", "relu_scale"), ("HAS_BIAS", "bias"), ("ACT", "silu"),
                                           ("HAS_RES", "res"), ("EMIT_STATS", "stats"), ("POOL", "pool"),
                                           ("PAD_STORE", "padstore")) if cons[k]]
                    align = "".join(tag for arg, tag in (("a_ptr", "a"), ("out_ptr", "y"), ("K", "K"), ("N", "N"))
                                    if arg in div16)
                    label = (f"gemm-{name}-{'-'.join(f for f in flags if f) or 'plain'}"
                             f"-{cfg.BM}x{cfg.BN}x{cfg.BK}-w{cfg.num_warps}s{cfg.num_stages}-div16:{align or 'w'}")
                    seen[key] = CompileConfig(label, gemm_kernel, _signature(name), cons, cfg.num_warps,
                                                     cfg.num_stages, aligned=div16)
    return list(seen.values())
