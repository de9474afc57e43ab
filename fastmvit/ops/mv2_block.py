"""``fastmvit::inverted_residual``: the MobileNetV2 block (1x1 expand + SiLU, 3x3 depthwise + SiLU, 1x1
project, residual) fused into one kernel, its unfused equivalent, the rule that picks one, and the
reference.

Public API (the engine's contract)::

    p = pack_inverted_residual(w1, b1, wdw, bdw, w3, b3, stride=s, dtype=torch.float16)
    #   folded float32 weights: w1 [HID, Cin, 1, 1] (or [HID, Cin]), wdw [HID, 1, 3, 3],
    #   w3 [Cout, HID, 1, 1] (or [Cout, HID]), biases [HID], [HID], [Cout]; residual defaults to
    #   (stride == 1 and Cin == Cout), as InvertedResidual.has_residual
    y = inverted_residual(x, p)                # x [B, H, W, Cin] NHWC in p.dtype -> y [B, OH, OW, Cout]
    y = inverted_residual(x, p, fused=False)   # force a path; None (default) asks should_fuse()
    should_fuse(cin, hidden, cout, stride, height=H, width=W, batch=B)  # -> bool, see its docstring
    fuse_choice(x, p)                          # should_fuse for x's map and batch
    y = inverted_residual_unfused(x, p, expand=None, project=None)     # the three-kernel path
    y_ref = inverted_residual_reference(x, p)                          # plain PyTorch in x.dtype

The unfused path runs the depthwise through ``fastmvit.ops.dwconv`` and the two 1x1s through
``expand(x2d, w1, b1) -> silu(x2d @ w1 + b1)`` and ``project(h2d, w3, b3, residual2d_or_None) ->
h2d @ w3 + b3 (+ residual)`` on ``[pixels, channels]`` matrices, which default to torch.addmm; the engine
passes the GEMM kernels there. Inference only: asking for a gradient through the op raises.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch.library import triton_op

from fastmvit.kernels import mv2_block as _k
from fastmvit.kernels.dwconv import out_size

from fastmvit.kernels._common import DRAM_BW, LAUNCH_COST, STEP_GEMM, empty_output, poisoning  # noqa: F401

from ._common import check_nhwc, inference_only
from .dwconv import dwconv3x3

__all__ = ["PackedInvertedResidual", "pack_inverted_residual", "inverted_residual", "inverted_residual_plan", "inverted_residual_unfused",
           "inverted_residual_reference", "should_fuse", "fuse_choice", "fusion_estimate"]


@dataclass(frozen=True)
class PackedInvertedResidual:
    """Weights in the layouts both paths read. w1 ``[Cin, HID]`` and w3 ``[HID, Cout]`` in the activation
    dtype (K-major B operands); wdw ``[9, HID]`` (tap-major) and b1, bdw ``[HID]``, b3 ``[Cout]`` float32."""

    w1: torch.Tensor
    b1: torch.Tensor
    wdw: torch.Tensor
    bdw: torch.Tensor
    w3: torch.Tensor
    b3: torch.Tensor
    stride: int
    residual: bool

    @property
    def cin(self) -> int:
        return self.w1.shape[0]

    @property
    def hidden(self) -> int:
        return self.w1.shape[1]

    @property
    def cout(self) -> int:
        return self.w3.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.w1.dtype


def pack_inverted_residual(w1: torch.Tensor, b1: torch.Tensor, wdw: torch.Tensor, bdw: torch.Tensor,
                           w3: torch.Tensor, b3: torch.Tensor, *, stride: int, dtype: torch.dtype,
                           residual: Optional[bool] = None) -> PackedInvertedResidual:
    """Folded float32 weights of the three ConvNormAct -> ``PackedInvertedResidual`` (see its docstring)."""
    w1, w3 = w1.detach().reshape(w1.shape[0], -1), w3.detach().reshape(w3.shape[0], -1)
    hidden, cin = w1.shape
    cout = w3.shape[0]
    if wdw.shape != (hidden, 1, 3, 3) or w3.shape[1] != hidden:
        raise ValueError(f"pack_inverted_residual: inconsistent shapes w1 {list(w1.shape)}, wdw {list(wdw.shape)}, "
                         f"w3 {list(w3.shape)}")
    if b1.shape != (hidden,) or bdw.shape != (hidden,) or b3.shape != (cout,):
        raise ValueError("pack_inverted_residual: biases must be [hidden], [hidden], [cout]")
    if stride not in (1, 2):
        raise ValueError(f"pack_inverted_residual: stride must be 1 or 2, got {stride}")
    if residual is None:
        residual = stride == 1 and cin == cout
    elif residual and not (stride == 1 and cin == cout):
        raise ValueError("pack_inverted_residual: a residual needs stride 1 and cin == cout")
    f32 = lambda t: t.detach().float().contiguous()  # noqa: E731
    return PackedInvertedResidual(
        w1=w1.t().to(dtype).contiguous(), b1=f32(b1), wdw=f32(wdw.reshape(hidden, 9).t()), bdw=f32(bdw),
        w3=w3.t().to(dtype).contiguous(), b3=f32(b3), stride=stride, residual=bool(residual))


# --------------------------------------------------------------------------------------------------
# when to fuse
# --------------------------------------------------------------------------------------------------

# DRAM_BW, LAUNCH_COST and STEP_GEMM are kernels._common's (the split rule shares them).
# H100 SXM figures the rule is written against (sm_90; H200 only raises DRAM_BW, which favours fusing).
# Achievable, not peak: ~80 % of 3.35 TB/s; 132 SMs x 16 MUFU ops/clk x 1.7 GHz; tensor-core rates for
# Triton wgmma at the tiny K (16 ... 128) of these blocks and at the GEMM kernels' larger tiles.
MUFU_RATE = 3.6e12        # ex2 / rcp per second (a SiLU costs two: ex2 + the division's rcp)
TC_RATE_FUSED = 2.0e14    # FLOP/s, fp16/bf16, per-tap expansion dots with K = Cin
TC_RATE_GEMM = 4.0e14     # FLOP/s, the unfused 1x1 GEMMs
FUSE_MARGIN = 0.9         # fuse only when predicted at least 10 % faster: the model is unmeasured

# The latency term: a grid of few CTAs with long serial loops cannot use the other SMs however little it
# computes (batch 1: stage 5's fused block is one CTA of 144 dependent steps). Per-step latencies are
# estimates from the kernels' structure (sm_90, ~1.7 GHz), not measurements: a GPU visit should re-fit them
# with ``python -m fastmvit info --plan`` beside the kernel microbenchmarks.
SMS = 132
STEP_FUSED = 0.35e-6      # one (hidden chunk, tap) step of the fused kernel: an x-tile gather that
                          # num_stages=1 does not prefetch (L2/DRAM latency), a wgmma, SiLU, the depthwise FMA;
                          # the low end of the review's 0.35-1 us (50-150 us for 144 steps), so the term
                          # overrules the roofline only where even the optimistic latency loses
STEP_DW = 1.0e-6          # the depthwise kernel's single step: nine tap loads in flight, then the FMAs.
                          # Since kernels/dwconv.py rolls its taps into a loop (registers 138 -> 64) the
                          # loads may no longer overlap: a GPU visit should time it (bench kernels). Not
                          # changed unmeasured: nine steps of STEP_FUSED would change 12 of the 40
                          # (variant x batch 1/8/64/256) fuse patterns, at batch 256 too.
CTAS_PER_SM_GEMM = 3      # resident CTAs per SM (kernels/check: 2-4 for the GEMM tiles; 1 for the fused
                          # kernel with 8 warps, about 2 with 4)


def latency(ctas: int, steps: int, step: float, ctas_per_sm: int = 1) -> float:
    """Seconds a grid of ``ctas`` programs, each running ``steps`` dependent steps of ``step`` seconds,
    needs at least: waves x serial depth x step latency."""
    return -(-ctas // (SMS * ctas_per_sm)) * steps * step


def kernel_shapes(cin: int, hidden: int, cout: int, stride: int, *, height: int, width: int, batch: int,
                  elem_bytes: int = 2) -> Dict[str, tuple]:
    """(CTAs, serial steps, CTAs per SM) of each kernel of both paths, with the GPU's launch rules."""
    from fastmvit.kernels import gemm as _gemm
    from fastmvit.kernels.dwconv import dwconv_config

    dt = torch.float16 if elem_bytes == 2 else torch.float32
    p_in = batch * height * width
    p_out = batch * out_size(height, stride) * out_size(width, stride)

    def gemm(M, N, K):
        c = _gemm.pick_config(M, N, K, dt, interpret=False)
        return -(-M // c.BM) * -(-N // c.BN), -(-K // c.BK), CTAS_PER_SM_GEMM

    bm, _, bh, _, warps, _ = _k.fused_config(cin, hidden, cout, dt, p_out, interpret=False)
    block_p, block_c, _ = dwconv_config(hidden, p_out, interpret=False, elem_bytes=elem_bytes)
    return {"fused": (-(-p_out // bm), -(-hidden // bh) * 9, 1 if warps == 8 else 2),
            "expand": gemm(p_in, hidden, cin),
            "depthwise": (-(-p_out // block_p) * -(-hidden // block_c), 1, CTAS_PER_SM_GEMM),
            "project": gemm(p_out, cout, hidden)}


def fusion_estimate(cin: int, hidden: int, cout: int, stride: int, *, height: int = 128, width: int = 128,
                    batch: int = 256, elem_bytes: int = 2) -> Dict[str, float]:
    """Estimate (seconds) of both paths for one block: each kernel costs
    ``max(bytes / DRAM_BW, mufu / MUFU_RATE, flops / TC_RATE, latency) + LAUNCH_COST``, where
    ``latency`` is waves x serial steps x step latency (``kernel_shapes``, ``latency``).

    unfused: expand GEMM (read x, write the hidden map, one SiLU per hidden value), depthwise (read the
    hidden map, write the strided hidden map, one SiLU each), project GEMM (+ residual read).
    fused: read x once (the halo re-reads hit L1/L2), write y; per output pixel 9 recomputed expansions
    (9 * hidden SiLUs) + hidden depthwise SiLUs; dots 9 * Cin * hidden + hidden * Cout MACs.
    Also returns each path's latency term (``fused_latency``, ``unfused_latency``)."""
    p_in = batch * height * width
    p_out = batch * out_size(height, stride) * out_size(width, stride)
    res = stride == 1 and cin == cout
    e = elem_bytes
    shapes = kernel_shapes(cin, hidden, cout, stride, height=height, width=width, batch=batch, elem_bytes=e)
    lat = {k: latency(ctas, steps, STEP_FUSED if k == "fused" else STEP_DW if k == "depthwise" else STEP_GEMM,
                      per_sm) for k, (ctas, steps, per_sm) in shapes.items()}

    def kernel(nbytes, mufu, flops, tc, latency_s):
        return max(nbytes / DRAM_BW, mufu / MUFU_RATE, flops / tc, latency_s) + LAUNCH_COST

    unfused = (kernel(e * p_in * (cin + hidden), 2 * p_in * hidden, 2 * p_in * cin * hidden, TC_RATE_GEMM,
                      lat["expand"])
               + kernel(e * (p_in + p_out) * hidden, 2 * p_out * hidden, 18 * p_out * hidden, float("inf"),
                        lat["depthwise"])
               + kernel(e * p_out * (hidden + cout * (1 + res)), 0, 2 * p_out * hidden * cout, TC_RATE_GEMM,
                        lat["project"]))
    fused = kernel(e * (p_in * cin + p_out * cout), 2 * 10 * p_out * hidden,
                   2 * p_out * hidden * (9 * cin + cout), TC_RATE_FUSED, lat["fused"])
    return {"fused": fused, "unfused": unfused, "fused_latency": lat["fused"],
            "unfused_latency": lat["expand"] + lat["depthwise"] + lat["project"]}


@functools.lru_cache(maxsize=None)  # asked on every forward, for a handful of shapes
def should_fuse(cin: int, hidden: int, cout: int, stride: int, *, height: Optional[int] = None,
                width: Optional[int] = None, batch: Optional[int] = None) -> bool:
    """Whether the fused kernel should run this block (16-bit activations; float32 follows the same
    choice). A documented rule, not a measurement (no GPU was available to this work):

    1. The fused kernel must be able to: Cin <= 128 and Cout <= 256 (its per-program limits; beyond,
       it would need a Cin loop or an output-channel split that repeats the recomputation).
    2. Then ``fusion_estimate`` decides: fuse when it predicts the fused kernel at most 0.9x the
       unfused time, at the given map and batch (default 128 x 128, batch 256: the throughput case).
       Each kernel's estimate is the largest of its traffic, MUFU, tensor-core and latency terms; the
       latency term (waves x serial steps per CTA x step latency) is what sees a small grid.

    What the estimate decides for the released blocks at 256 x 256 input (and why it is not simply
    "fuse the early blocks"): the recomputed expansion is cheap on tensor cores while Cin is small,
    but each recomputation also re-evaluates a SiLU on the MUFU pipe (16 ops/clk/SM against 1024
    FLOP/clk/SM of fp16 tensor cores): ~20 * hidden MUFU ops per output pixel, 10x the unfused path's.
    * batch >= 64: every stride-2 block with Cin <= 64 fuses (predicted 0.56-0.79x the unfused time:
      the recompute falls to 2.25x per input pixel and the saved traffic, the full-resolution hidden
      map, is largest); Cin 80 is marginal (80->320->96 fuses at 0.88x, 80->160->160 not at 0.91x);
      stride-2 blocks with Cin >= 96 do not (the 9 * Cin * hidden recompute dominates); no stride-1
      block does (1.3-3.1x: the SiLUs cost more than the 2-2.5x traffic saved).
    * batch 1: the blocks on the 128 x 128 map fuse where the recompute is small (xxs 16->32->16 and
      16->32->24, S 16->64->32: one kernel saves two launches), but from the 64 x 64 map on the fused
      grid is a few CTAs with long serial loops (S stage 3: 16 CTAs x 72 steps, stage 4: 4 x 108, stage
      5: 1 x 144; ~25-50 us by the latency term) against ~10 us for three short unfused kernels.
    A GPU measurement should re-fit the constants above: time both paths per block with
    ``inverted_residual(x, p, fused=True/False)`` and adjust MUFU_RATE / TC_RATE_FUSED until the rule
    agrees with the clock.
    """
    if cin > _k.MAX_CIN or cout > _k.MAX_COUT:
        return False
    est = fusion_estimate(cin, hidden, cout, stride, height=height or 128, width=width or 128,
                          batch=batch or 256)
    return est["fused"] <= FUSE_MARGIN * est["unfused"]


def fuse_choice(x: torch.Tensor, p: PackedInvertedResidual) -> bool:
    """``should_fuse`` for block ``p`` on NHWC ``x``: it reads only x's shape, so the engine asks it once
    per input signature (its launch plans record the answer: ``fastmvit.engine.replay.PLANS``)."""
    return should_fuse(p.cin, p.hidden, p.cout, p.stride, height=x.shape[1], width=x.shape[2], batch=x.shape[0])


# --------------------------------------------------------------------------------------------------
# the op and the two paths
# --------------------------------------------------------------------------------------------------

def _check(x, w1, b1, wdw, bdw, w3, b3, stride, residual):
    check_nhwc("inverted_residual", x, w1.shape[0])
    cin, hidden = w1.shape
    cout = w3.shape[1]
    if w1.dtype != x.dtype or w3.dtype != x.dtype:
        raise ValueError(f"inverted_residual: w1/w3 must be in the activation dtype {x.dtype}, got {w1.dtype}, "
                         f"{w3.dtype} (pack with dtype={x.dtype})")
    if w3.shape[0] != hidden or wdw.shape != (9, hidden) or b1.shape != (hidden,) or bdw.shape != (hidden,) \
            or b3.shape != (cout,):
        raise ValueError("inverted_residual: packed weights of inconsistent shapes (use pack_inverted_residual)")
    if any(t.dtype != torch.float32 for t in (b1, wdw, bdw, b3)):
        raise ValueError("inverted_residual: biases and depthwise weights must be float32")
    if cin > _k.MAX_CIN or cout > _k.MAX_COUT:
        raise ValueError(f"inverted_residual: the fused kernel takes Cin <= {_k.MAX_CIN} and Cout <= "
                         f"{_k.MAX_COUT}, got {cin} -> {cout}; use the unfused path")
    if residual and (stride != 1 or cin != cout):
        raise ValueError("inverted_residual: a residual needs stride 1 and cin == cout")
    if stride not in (1, 2):
        raise ValueError(f"inverted_residual: stride must be 1 or 2, got {stride}")
    if x.stride(-1) != 1:
        raise ValueError("inverted_residual: the channel dim must be contiguous (stride 1)")
    if any(t.device != x.device for t in (w1, b1, wdw, bdw, w3, b3)):
        raise ValueError("inverted_residual: weights and activation must share a device")


class FusedPlan:
    """The fused kernel resolved for one signature: ``plan(x, p)`` allocates y and launches."""

    __slots__ = ("launch", "y_shape", "dtype", "device", "poison", "copy")

    def __init__(self, launch, y_shape, dtype, device, poison, copy=False):
        self.launch, self.y_shape, self.dtype, self.device, self.poison = launch, y_shape, dtype, device, poison
        self.copy = copy

    def run(self, x, w1, b1, wdw, bdw, w3, b3, traced: bool = False) -> torch.Tensor:
        if self.copy:
            x = x.contiguous()
        y = empty_output(self.y_shape, self.dtype, self.device, self.poison, traced)
        if self.launch is not None:
            (self.launch.traced if traced else self.launch)(x, w1, b1, wdw, bdw, w3, b3, y)
        return y

    def __call__(self, x: torch.Tensor, p: PackedInvertedResidual, **_) -> torch.Tensor:
        return self.run(x, p.w1, p.b1, p.wdw, p.bdw, p.w3, p.b3)


def _plan(x, w1, b1, wdw, bdw, w3, b3, stride, residual) -> FusedPlan:
    _check(x, w1, b1, wdw, bdw, w3, b3, stride, residual)
    B, H, W, _ = x.shape
    y_shape = (B, out_size(H, stride), out_size(W, stride), w3.shape[1])
    empty = B * y_shape[1] * y_shape[2] * y_shape[3] == 0
    launch = None if empty else _k.inverted_residual_plan(x, w1.shape[1], y_shape, stride, residual)
    return FusedPlan(launch, y_shape, x.dtype, x.device, poisoning())


@triton_op("fastmvit::inverted_residual", mutates_args=())
def _inverted_residual_op(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, wdw: torch.Tensor,
                          bdw: torch.Tensor, w3: torch.Tensor, b3: torch.Tensor, *, stride: int,
                          residual: bool) -> torch.Tensor:
    return _plan(x, w1, b1, wdw, bdw, w3, b3, stride, residual).run(x, w1, b1, wdw, bdw, w3, b3, traced=True)


inference_only(_inverted_residual_op, "fastmvit::inverted_residual")


def inverted_residual(x: torch.Tensor, p: PackedInvertedResidual, *, fused: Optional[bool] = None) -> torch.Tensor:
    """The block on NHWC ``x [B, H, W, Cin]`` -> ``[B, OH, OW, Cout]`` in x.dtype; ``fused=None`` asks
    ``should_fuse`` with x's map and batch."""
    if fused is None:
        fused = fuse_choice(x, p)
    if not fused:
        return inverted_residual_unfused(x, p)
    if x.stride(-1) != 1:
        x = x.contiguous()
    return _inverted_residual_op(x, p.w1, p.b1, p.wdw, p.bdw, p.w3, p.b3, stride=p.stride, residual=p.residual)


def inverted_residual_plan(x: torch.Tensor, p: PackedInvertedResidual, *, fused: Optional[bool] = None):
    """``inverted_residual`` resolved once for an x like this one: called with the same arguments, the
    fused kernel launches without the op dispatch (the unfused path is returned as it is: its three ops
    are planned where the engine calls them one by one)."""
    if fused is None:
        fused = fuse_choice(x, p)
    if not fused:
        return inverted_residual
    copy = x.stride(-1) != 1
    plan = _plan(x.contiguous() if copy else x, p.w1, p.b1, p.wdw, p.bdw, p.w3, p.b3, p.stride, p.residual)
    plan.copy = copy
    return plan


def _expand_torch(x2d, w1, b1):
    return F.silu(torch.addmm(b1.to(x2d.dtype), x2d, w1))


def _project_torch(h2d, w3, b3, res2d):
    y = torch.addmm(b3.to(h2d.dtype), h2d, w3)
    return y if res2d is None else y + res2d


def inverted_residual_unfused(x: torch.Tensor, p: PackedInvertedResidual, *, expand: Optional[Callable] = None,
                              project: Optional[Callable] = None) -> torch.Tensor:
    """Three passes: expand (1x1 + SiLU), ``dwconv3x3`` (+ SiLU), project (1x1 + residual). ``expand`` and
    ``project`` default to torch.addmm; the engine passes its GEMM kernels (signatures in the module
    docstring). The hidden maps are stored in x.dtype between passes."""
    check_nhwc("inverted_residual", x, p.cin)
    B, H, W, _ = x.shape
    x = x.contiguous()
    h = (expand or _expand_torch)(x.reshape(-1, p.cin), p.w1, p.b1).reshape(B, H, W, p.hidden)
    h = dwconv3x3(h, p.wdw, p.bdw, stride=p.stride, dilation=1, act=True)
    OH, OW = h.shape[1:3]
    res = x.reshape(-1, p.cin) if p.residual else None
    return (project or _project_torch)(h.reshape(-1, p.hidden), p.w3, p.b3, res).reshape(B, OH, OW, p.cout)


def inverted_residual_reference(x: torch.Tensor, p: PackedInvertedResidual) -> torch.Tensor:
    """Plain PyTorch convolutions on the packed weights, computed in ``x.dtype``."""
    dt = x.dtype
    xn = x.permute(0, 3, 1, 2)
    h = F.silu(F.conv2d(xn, p.w1.t().to(dt)[:, :, None, None], p.b1.to(dt)))
    wdw = p.wdw.t().reshape(p.hidden, 1, 3, 3).to(dt)
    h = F.silu(F.conv2d(h, wdw, p.bdw.to(dt), stride=p.stride, padding=1, groups=p.hidden))
    y = F.conv2d(h, p.w3.t().to(dt)[:, :, None, None], p.b3.to(dt))
    if p.residual:
        y = y + xn
    return y.permute(0, 2, 3, 1).contiguous()
