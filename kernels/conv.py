"""Dense 3x3 convolution (padding = dilation) + folded-BN bias + optional SiLU or ReLU as an implicit GEMM on
tensor cores.

The GEMM is ``[M = B*OH*OW pixels, K = 9 * Cin] @ [K, Cout]``; the A tile of a tap is the input pixels
under that tap, loaded straight from the NHWC activation (zero outside the map), so no im2col buffer
exists. Three MobileViT uses:

* the stem (3 -> 16 ... 64 channels, stride 2), reading the model's NCHW input in place: with
  ``9 * Cin <= 64`` the whole K axis is one gathered ``[BLOCK_M, BLOCK_K]`` tile (``FLAT_K``) and the
  input strides are arbitrary, so NCHW is just another set of strides;
* the v1 block's local conv (C -> C, C = 48 ... 160);
* the v1 fusion conv over the channel concatenation ``[x, x2]`` (2C -> C): the K loop runs over x's
  channels, then x2's (``HAS_X2``), so the concatenation never exists in memory;
* DeepLabV3's atrous ASPP branches (conv-BN-ReLU, dilation 6/12/18 ...). The dilation is a run-time
  argument (``DIL``, never specialised): one compiled kernel serves every rate.

Weights arrive packed ``[9 * (C1 + C2), Cout]`` (row = tap * (C1 + C2) + input channel) in the
activation dtype; the bias is float32.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import (DEFAULT_SM_COUNT, MAX_SPLIT, STEP_GEMM, TRITON_DTYPE, CompileConfig, Launch, empty_output,
                      interpreting, poisoning, silu, sm_count, split_rule, target_arch, vec_width)
from .dwconv import out_size

FLAT_K_MAX_CIN = 7  # 9 * 7 = 63 taps x channels fit one BLOCK_K = 64 gathered tile


@triton.jit
def _implicit_gemm_pass(acc, x_b, sh, sw, C, c_off, CT, w_ptr, n, n_ok, COUT, ih0, iw0, m_ok, H, W, rk, DIL, i0, i1,
                        BLOCK_K: tl.constexpr, PREC: tl.constexpr):
    """acc += sum over taps and this input's C channels of x[pixel under tap, c] * w[tap * CT + c_off + c, n],
    over the flattened (tap, channel chunk) steps [i0, i1) of this input's 9 * cdiv(C, BLOCK_K).
    x_b: [BLOCK_M] pointers to each pixel's image; ih0/iw0: the top-left tap's coordinates."""
    nk = tl.cdiv(C, BLOCK_K)
    for i in range(i0, i1):
        tap = i // nk
        k0 = (i - tap * nk) * BLOCK_K
        ih = ih0 + (tap // 3) * DIL
        iw = iw0 + (tap % 3) * DIL
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
def _bias_act(acc, b_ptr, n, n_ok, ACT: tl.constexpr):
    """The epilogue, shared by the unsplit kernel and the split-K merge: + bias[n], then the activation
    ``ACT`` ("none", "silu", "relu": see ``act_name``)."""
    acc += tl.load(b_ptr + n, mask=n_ok, other=0.0)[None, :]
    if ACT == "silu":
        acc = silu(acc)
    elif ACT == "relu":
        acc = tl.maximum(acc, 0.0)
    return acc


@triton.jit(do_not_specialize=["DIL"])
def _conv3x3_kernel(
    x_ptr, x2_ptr, w_ptr, b_ptr, y_ptr,
    H, W, C1, C2, COUT, OH, OW, M,
    sxb, sxh, sxw, sxc,                       # x strides in elements, logical (b, h, w, c) order
    s2b, s2h, s2w,                            # x2 strides (channels contiguous)
    DIL,                                      # dilation (= padding), a run-time value
    STRIDE: tl.constexpr, ACT: tl.constexpr, HAS_X2: tl.constexpr, FLAT_K: tl.constexpr,
    VEC: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr,
):
    # y: [B, OH, OW, COUT] contiguous. SPLIT (split-K over program axis 2, of num_programs(2) = S programs):
    # y is the float32 partial sums [S, M, COUT] and ``_splitk_merge_kernel`` adds them, the bias and the
    # activation. S is a grid size, not a constexpr: every split count runs the same compiled kernel.
    tl.static_assert(not (SPLIT and FLAT_K), "the flat-K stem is one K step: nothing to split")
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
    ih0 = oh * STRIDE - DIL
    iw0 = ow * STRIDE - DIL
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if FLAT_K:
        # K = (tap, channel) flattened: one gathered tile covers every tap of a tiny-Cin conv (the stem)
        tap = rk // C1
        ci = rk - tap * C1
        kh = tap // 3
        kw = tap - kh * 3
        k_ok = rk < 9 * C1
        ih = ih0[:, None] + kh[None, :] * DIL
        iw = iw0[:, None] + kw[None, :] * DIL
        ok = m_ok[:, None] & k_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        off = b[:, None] * sxb + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw + ci[None, :].to(tl.int64) * sxc
        a = tl.load(x_ptr + off, mask=ok, other=0.0)
        wt = tl.load(w_ptr + rk[:, None] * COUT + n[None, :], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, wt, acc, input_precision=PREC)
    else:
        # The K loop runs over (tap, channel chunk) flattened: one software-pipelined loop per input
        # rather than nine short ones (C = 48 is three chunks of 16), and a fraction of the compile time.
        CT = C1 + C2
        n1 = 9 * tl.cdiv(C1, BLOCK_K)  # x's steps, then x2's: one flattened K axis of n1 + n2 steps
        n2 = 9 * tl.cdiv(C2, BLOCK_K)
        lo1, hi1, lo2, hi2 = 0, n1, 0, n2
        if SPLIT:  # this program's contiguous share of the K steps, clipped to each input's range
            chunk = tl.cdiv(n1 + n2, tl.num_programs(2))
            lo = tl.program_id(2) * chunk
            lo1, hi1 = tl.minimum(lo, n1), tl.minimum(lo + chunk, n1)
            lo2, hi2 = tl.maximum(lo - n1, 0), tl.minimum(lo + chunk - n1, n2)
        acc = _implicit_gemm_pass(acc, x_ptr + b * sxb, sxh, sxw, C1, 0, CT, w_ptr, n, n_ok, COUT, ih0, iw0, m_ok,
                                  H, W, rk, DIL, lo1, hi1, BLOCK_K, PREC)
        if HAS_X2:  # channels [C1, C1 + C2) of the virtual concatenation
            acc = _implicit_gemm_pass(acc, x2_ptr + b * s2b, s2h, s2w, C2, C1, CT, w_ptr, n, n_ok, COUT, ih0, iw0,
                                      m_ok, H, W, rk, DIL, lo2, hi2, BLOCK_K, PREC)
    if SPLIT:  # partial sums to slot program_id(2); bias and activation wait for the merge
        y_ptr += tl.program_id(2).to(tl.int64) * M * COUT
    else:
        acc = _bias_act(acc, b_ptr, n, n_ok, ACT)
    y_off = m.to(tl.int64)[:, None] * COUT + n[None, :]
    tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _splitk_merge_kernel(p_ptr, b_ptr, y_ptr, M, COUT, SLOT, SPLIT, ACT: tl.constexpr, VEC: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """y[m, n] = act(sum_s p[s, m, n] + bias[n]): the SPLIT float32 partial sums (slots of SLOT = M * COUT
    elements) added in slot order (a fixed order, no atomics: the result is deterministic and the same on
    every replay), written in y's dtype."""
    if VEC > 1:
        COUT = (COUT // VEC) * VEC
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < COUT
    mask = (m < M)[:, None] & n_ok[None, :]
    off = m.to(tl.int64)[:, None] * COUT + n[None, :]
    p = p_ptr + off
    acc = tl.load(p, mask=mask, other=0.0)
    for _ in range(1, SPLIT):
        p += SLOT  # one slot at a time: 64-bit pointer arithmetic, no 32-bit s * SLOT product
        acc += tl.load(p, mask=mask, other=0.0)
    acc = _bias_act(acc, b_ptr, n, n_ok, ACT)
    tl.store(y_ptr + off, acc.to(y_ptr.dtype.element_ty), mask=mask)


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


ACTS = ("none", "silu", "relu")


def act_name(act) -> str:
    """The kernel's ``ACT``: True (SiLU, MobileViT's) / False (none), or one of ``ACTS`` by name."""
    name = act if isinstance(act, str) else {True: "silu", False: "none"}.get(act)
    if name not in ACTS:
        raise ValueError(f"conv3x3: act must be a bool or one of {ACTS}, got {act!r}")
    return name


class SplitConvLaunch:
    """A split-K conv resolved for one signature: ``plan(x, x2, w, bias, y)`` allocates the float32 partial
    sums [SPLIT, M, Cout], launches the conv into them and the merge into y (``traced``: both through
    wrap_triton). ``decision``: the split rule's ``SplitDecision``."""

    __slots__ = ("main", "merge", "partial_shape", "device", "poison", "decision")

    def __init__(self, main: Launch, merge: Launch, partial_shape, device, poison: bool, decision):
        self.main, self.merge, self.partial_shape, self.device = main, merge, partial_shape, device
        self.poison, self.decision = poison, decision

    def __call__(self, x, x2, w, bias, y) -> None:
        p = empty_output(self.partial_shape, torch.float32, self.device, self.poison, traced=False)
        self.main(x, x2, w, bias, p)
        self.merge(p, bias, y)

    def traced(self, x, x2, w, bias, y) -> None:
        p = empty_output(self.partial_shape, torch.float32, self.device, self.poison)
        self.main.traced(x, x2, w, bias, p)
        self.merge.traced(p, bias, y)

    def __repr__(self) -> str:
        return f"SplitConvLaunch({self.main!r}, {self.merge!r})"


def conv3x3_steps(c1: int, c2: int, block_k: int, flat: bool) -> int:
    """Serial K steps of one conv program: the flattened (tap, channel chunk) loop over x, then x2."""
    return 1 if flat else 9 * (triton.cdiv(c1, block_k) + triton.cdiv(c2, block_k))


def conv3x3_split(c1: int, c2: int, cout: int, M: int, config: Tuple[int, int, int, int, int], flat: bool,
                  sms: int, force: Optional[int] = None, interpret: Optional[bool] = None):
    """The split rule's ``SplitDecision`` for one conv: its grid and K steps against ``sms`` SMs, the merge's
    grid and the partials' traffic. The flat-K stem (one step) is judged but never split."""
    bm, bn, bk, warps, _ = config
    mbm, mbn, _ = merge_config(M, cout, interpret)
    return split_rule(triton.cdiv(M, bm) * triton.cdiv(cout, bn), conv3x3_steps(c1, c2, bk, flat), STEP_GEMM, sms,
                      partial_bytes=4 * M * cout, merge_ctas=triton.cdiv(M, mbm) * triton.cdiv(cout, mbn),
                      ctas_per_sm=1 if warps == 8 else 2, max_split=1 if flat else MAX_SPLIT, force=force,
                      kernel="conv3x3", interpret=interpret)


def split_stages(dtype: torch.dtype, stages: int) -> int:
    """Pipeline stages of a split-K conv's first pass. Its float32 partials at the 64x64x16 tile with 2
    stages spill 8 bytes on sm_90 under triton 3.6 (capped at 96 registers); with 3 they take 128 and
    spill on neither sm_90 nor sm_80, under 3.6 or 3.9."""
    return 3 if dtype == torch.float32 else stages


def merge_config(M: int, cout: int, interpret: Optional[bool] = None) -> Tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) of the split-K merge: an elementwise pass over [M, Cout]."""
    bn = max(16, min(128, triton.next_power_of_2(cout)))
    if interpreting() if interpret is None else interpret:
        return max(16, min(512, triton.next_power_of_2(M))), max(16, min(256, triton.next_power_of_2(cout))), 4
    return 32, bn, 4  # 32 float32 values per thread at BLOCK_N 128: a light, memory-bound pass


def conv3x3_plan(x: torch.Tensor, x_strides: Tuple[int, int, int, int], H: int, W: int, c1: int,
                 x2: Optional[torch.Tensor], y_shape: Tuple[int, int, int, int], stride: int, act,
                 split: Optional[int] = None, *, dilation: int = 1):
    """The launch for tensors like these (metadata only): ``plan(x, x2 or x, w, bias, y)`` writes a
    contiguous ``y [B, OH, OW, Cout]``. x holds ``c1`` channels of an ``H x W`` map with strides
    ``x_strides`` in logical (b, h, w, c) order (an NCHW tensor passes ``(s0, s2, s3, s1)``); ``x2`` is
    the NHWC second input of the fusion conv, or None. ``act``: see ``act_name``; padding = ``dilation``.

    Split-K: ``split_rule`` judges the grid against the SMs and the K steps per program (the stage-5
    fusion conv of S at batch 1 is 3 CTAs x 90 steps); ``split`` (else ``FASTMVIT_SPLIT``) forces N ways.
    A split plan is a ``SplitConvLaunch`` (conv into float32 partials, then the merge), else a ``Launch``."""
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
    act = act_name(act)
    mbm, mbn, mwarps = merge_config(M, cout)
    decision = conv3x3_split(c1, c2, cout, M, (bm, bn, bk, warps, stages), flat, sm_count(x.device), split)
    scalars = (H, W, c1, c2, cout, OH, OW, M, sxb, sxh, sxw, sxc, *s2, dilation)
    meta = dict(STRIDE=stride, HAS_X2=x2 is not None, FLAT_K=flat, VEC=vec, PREC=prec, BLOCK_M=bm, BLOCK_N=bn,
                BLOCK_K=bk, num_warps=warps, num_stages=stages)
    if decision.n == 1:
        return Launch(_conv3x3_kernel, grid, scalars, ACT=act, SPLIT=False, **meta)
    meta["num_stages"] = split_stages(x.dtype, stages)
    main = Launch(_conv3x3_kernel, (*grid, decision.n), scalars, ACT="none", SPLIT=True, **meta)
    merge = Launch(_splitk_merge_kernel, (triton.cdiv(M, mbm), triton.cdiv(cout, mbn)),
                   (M, cout, M * cout, decision.n), ACT=act, VEC=vec_width(x.dtype, cout), BLOCK_M=mbm, BLOCK_N=mbn,
                   num_warps=mwarps, num_stages=1)
    return SplitConvLaunch(main, merge, (decision.n, M, cout), x.device, poisoning(), decision)


def conv3x3_launch(x: torch.Tensor, x_strides: Tuple[int, int, int, int], H: int, W: int, c1: int,
                   x2: Optional[torch.Tensor], w: torch.Tensor, bias: torch.Tensor, y: torch.Tensor,
                   stride: int, act, split: Optional[int] = None, *, dilation: int = 1) -> torch.Tensor:
    """Launch (traceably) into a preallocated contiguous ``y [B, OH, OW, Cout]``; see ``conv3x3_plan``."""
    conv3x3_plan(x, x_strides, H, W, c1, x2, tuple(y.shape), stride, act, split, dilation=dilation).traced(
        x, x2 if x2 is not None else x, w, bias, y)
    return y


# --------------------------------------------------------------------------------------------------
# every specialisation the engine launches
# --------------------------------------------------------------------------------------------------

def conv3x3_uses(size: int = 256) -> List[Tuple[str, int, int, int, int, int]]:
    """(kind, C1, C2, Cout, stride, output pixels per image) of every dense 3x3 in the released variants
    at ``size`` x ``size``: "stem", "local" (v1 conv_kxk) and "fusion" (v1 conv_fusion); and "aspp", the
    atrous branches of the DeepLabV3 head (ReLU; any dilation) at ``2 * size`` (segmentation's 512 for
    256), output stride 16."""
    from fastmvit.variants import VARIANTS

    from .aspp import ASPP_CHANNELS

    uses = set()
    for v in VARIANTS.values():
        hw = out_size(size, 2)
        uses.add(("stem", 3, 0, v.stem_channels, 2, hw * hw))
        for s in v.stages:
            hw = out_size(hw, s.stride)
            if s.transformer is not None and v.family == "v1":
                uses.add(("local", s.out_channels, 0, s.out_channels, 1, hw * hw))
                uses.add(("fusion", s.out_channels, s.out_channels, s.out_channels, 1, hw * hw))
        seg = 2 * size // 16
        uses.add(("aspp", v.stage_channels[-1], 0, ASPP_CHANNELS[v.family], 1, seg * seg))
    return sorted(uses)


def compile_configs(arch: int = 90) -> List[CompileConfig]:
    """One config per (use, dtype, tile, split) under the launch rules of sm_<arch>: batch 1 and batch 256
    can pick different BLOCK_M; where the split rule splits (batch 1, on the SMs of an H100 for sm_90, of an
    A100 below), the split conv, its merge and the unsplit conv (``FASTMVIT_SPLIT=1``) are all compiled."""
    sms = DEFAULT_SM_COUNT if arch >= 90 else 108
    configs, seen = [], set()
    for kind, c1, c2, cout, stride, pixels in conv3x3_uses():
        flat = kind == "stem"
        for dtype, name in TRITON_DTYPE.items():
            for batch in (1, 256):
                M = batch * pixels
                cfg = conv3x3_config(c1, c2, cout, M, dtype, flat, interpret=False, arch=arch)
                bm, bn, bk, warps, stages = cfg
                n = conv3x3_split(c1, c2, cout, M, cfg, flat, sms, interpret=False).n
                vec = vec_width(dtype, cout) if flat else vec_width(dtype, cout, c1, c2)
                prec = "ieee" if dtype == torch.float32 else "tf32"
                for split in sorted({False, n > 1}):
                    act = "relu" if kind == "aspp" else "silu"
                    const = {"STRIDE": stride, "ACT": "none" if split else act, "HAS_X2": bool(c2), "FLAT_K": flat, "VEC": vec,
                             "PREC": prec, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT": split}
                    ns = split_stages(dtype, stages) if split else stages
                    key = (tuple(sorted(const.items())), name, warps, ns)
                    if key in seen:
                        continue
                    seen.add(key)
                    sig = {"x_ptr": f"*{name}", "x2_ptr": f"*{name}", "w_ptr": f"*{name}", "b_ptr": "*fp32",
                           "y_ptr": "*fp32" if split else f"*{name}"}
                    sig.update({a: "i32" for a in ("H", "W", "C1", "C2", "COUT", "OH", "OW", "M", "sxb", "sxh",
                                                   "sxw", "sxc", "s2b", "s2h", "s2w", "DIL")})
                    sig.update({k: "constexpr" for k in const})
                    aligned = ["x_ptr", "x2_ptr", "w_ptr", "b_ptr", "y_ptr"]
                    aligned += [a for a, v in (("C1", c1), ("C2", c2), ("COUT", cout)) if v % 16 == 0]
                    if not flat:  # NHWC strides are multiples of C
                        aligned += ["sxb", "sxh", "sxw"] + (["s2b", "s2h", "s2w"] if c2 else [])
                    tag = "-splitk" if split else ""
                    configs.append(CompileConfig(
                        name=f"conv3x3-{kind}-C{c1}+{c2}-O{cout}-BM{bm}BN{bn}BK{bk}{tag}-{name}", fn=_conv3x3_kernel,
                        signature=sig, constexprs=const, num_warps=warps, num_stages=ns, aligned=tuple(aligned)))
                if n > 1:
                    mbm, mbn, mwarps = merge_config(M, cout, interpret=False)
                    const = {"ACT": act, "VEC": vec_width(dtype, cout), "BLOCK_M": mbm, "BLOCK_N": mbn}
                    key = ("merge", tuple(sorted(const.items())), name, cout % 16 == 0)  # Cout is a run-time arg
                    if key in seen:
                        continue
                    seen.add(key)
                    sig = {"p_ptr": "*fp32", "b_ptr": "*fp32", "y_ptr": f"*{name}", "M": "i32", "COUT": "i32",
                           "SLOT": "i32", "SPLIT": "i32", **{k: "constexpr" for k in const}}
                    aligned = ["p_ptr", "b_ptr", "y_ptr"] + (["COUT", "SLOT"] if cout % 16 == 0 else [])
                    configs.append(CompileConfig(
                        name=f"conv3x3-splitk-merge{'-relu' if act == 'relu' else ''}-BM{mbm}BN{mbn}V{const['VEC']}-{name}", fn=_splitk_merge_kernel,
                        signature=sig, constexprs=const, num_warps=mwarps, num_stages=1, aligned=tuple(aligned)))
    return configs
