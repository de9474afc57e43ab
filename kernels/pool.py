"""Global mean pooling fused with the classifier: logits[B, NC] = mean_{hw} x[b, hw, :] @ W + bias.

x is the NHWC map viewed as [B, HW, C] (HW = 1 makes this the plain classifier on pooled features).
One program per (block of BB samples, block of BN classes) pools its samples' channels chunk by chunk
(fp32 sums over the map) and feeds each pooled [BB, BK] chunk, cast to the weight dtype as PyTorch's
pooled tensor would be, to tl.dot against W [BK, BN]; the logits are written in float32. Channel chunks
are re-pooled by each class block: BN = 256 keeps that to cdiv(1000, 256) = 4 passes over the (small,
L2-resident) final map instead of a round trip through memory and a second launch.
"""
from __future__ import annotations

from typing import List

import torch
import triton
import triton.language as tl

from ._common import TRITON_DTYPE, CompileConfig, Launch, empty_output, interpreting, poisoning

__all__ = ["pool_linear", "compile_configs"]


@triton.jit
def pool_linear_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, B, HW, C, NC, stride_xb, stride_xh, stride_wk,
                       HAS_BIAS: tl.constexpr, RELU: tl.constexpr, BB: tl.constexpr, BHW: tl.constexpr, BK: tl.constexpr,
                       BN: tl.constexpr, PRECISION: tl.constexpr):
    """x [B, HW, C] (column stride 1), w [C, NC_pad], bias [NC] float32, out [B, NC] float32."""
    offs_b = tl.program_id(0) * BB + tl.arange(0, BB)
    offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
    b_ok = offs_b < B
    n_ok = offs_n < NC
    x_b = x_ptr + offs_b.to(tl.int64)[:, None, None] * stride_xb
    acc = tl.zeros([BB, BN], dtype=tl.float32)
    for k0 in range(0, C, BK):
        offs_k = k0 + tl.arange(0, BK)
        k_ok = offs_k < C
        pooled = tl.zeros([BB, BK], dtype=tl.float32)
        for h0 in range(0, HW, BHW):
            offs_h = h0 + tl.arange(0, BHW)
            mask = b_ok[:, None, None] & (offs_h < HW)[None, :, None] & k_ok[None, None, :]
            x = tl.load(x_b + offs_h[None, :, None] * stride_xh + offs_k[None, None, :], mask=mask, other=0.0)
            pooled += tl.sum(x.to(tl.float32), axis=1)
        a = tl.fdiv(pooled, HW * 1.0).to(w_ptr.dtype.element_ty)
        w = tl.load(w_ptr + offs_k.to(tl.int64)[:, None] * stride_wk + offs_n[None, :],
                    mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
    if RELU:  # DeepLabV3's image-pooling branch (1x1 conv-BN-ReLU on the pooled map)
        acc = tl.maximum(acc, 0.0)
    tl.store(out_ptr + offs_b.to(tl.int64)[:, None] * NC + offs_n[None, :], acc,
             mask=b_ok[:, None] & n_ok[None, :])


def _gpu_blocks(HW: int, dtype: torch.dtype):
    """(BB, BHW, BK, BN, num_warps) on the GPU. BB = 16 is tl.dot's minimum; [16, 8, 64] x-chunks are 16
    values per thread with 8 warps."""
    bhw = min(8, triton.next_power_of_2(HW))
    if dtype == torch.float32:
        return 16, bhw, 32, 128, 4
    return 16, bhw, 64, 256, 8


def _blocks(B: int, HW: int, C: int, NC: int, dtype: torch.dtype):
    if interpreting():
        return (max(16, min(64, triton.next_power_of_2(B))), min(64, triton.next_power_of_2(HW)),
                min(128, max(16, triton.next_power_of_2(C))), min(256, max(16, triton.next_power_of_2(NC))), 4)
    return _gpu_blocks(HW, dtype)


class PoolPlan:
    """``pool_linear`` resolved for one signature: ``plan(x, w, bias)`` allocates the logits and launches."""

    __slots__ = ("launch", "out_shape", "device", "poison")

    def __init__(self, launch_, out_shape, device, poison):
        self.launch, self.out_shape, self.device, self.poison = launch_, out_shape, device, poison

    def __call__(self, x, w, bias, traced: bool = False) -> torch.Tensor:
        out = empty_output(self.out_shape, torch.float32, self.device, self.poison, traced)
        (self.launch.traced if traced else self.launch)(x, w, out if bias is None else bias, out)
        return out


def pool_linear_plan(x: torch.Tensor, w: torch.Tensor, n_classes: int, has_bias: bool, relu: bool = False) -> PoolPlan:
    """The launch for x [B, HW, C] (column stride 1) and w [C, NC_pad] like these (metadata only)."""
    B, HW, C = x.shape
    BB, BHW, BK, BN, warps = _blocks(B, HW, C, n_classes, w.dtype)
    grid = (triton.cdiv(B, BB), triton.cdiv(n_classes, BN))
    kernel_launch = Launch(pool_linear_kernel, grid, (B, HW, C, n_classes, x.stride(0), x.stride(1), w.stride(0)),
                           HAS_BIAS=has_bias, RELU=relu, BB=BB, BHW=BHW, BK=BK, BN=BN,
                           PRECISION="ieee" if w.dtype == torch.float32 else "tf32", num_warps=warps, num_stages=2)
    return PoolPlan(kernel_launch, (B, n_classes), x.device, poisoning())


def pool_linear(x: torch.Tensor, w: torch.Tensor, n_classes: int, bias, relu: bool = False) -> torch.Tensor:
    """x [B, HW, C] (column stride 1), w [C, NC_pad] packed -> logits [B, n_classes] float32 (traceably),
    through a ReLU if ``relu``."""
    return pool_linear_plan(x, w, n_classes, bias is not None, relu)(x, w, bias, traced=True)


def _signature(x_type: str, w_type: str) -> dict:
    sig = {"x_ptr": x_type, "w_ptr": w_type, "bias_ptr": "*fp32", "out_ptr": "*fp32"}
    sig.update({k: "i32" for k in ("B", "HW", "C", "NC", "stride_xb", "stride_xh", "stride_wk")})
    sig.update({k: "constexpr" for k in ("HAS_BIAS", "RELU", "BB", "BHW", "BK", "BN", "PRECISION")})
    return sig


def compile_configs() -> List[CompileConfig]:
    """The classifier after the final map (x in the activation dtype, 8x8 at 256x256) and after the GEMM's
    pooling epilogue (x = pooled float32 features, HW = 1), for each dtype; x's rows 16-divisible (every
    released variant's final width is) or not. And DeepLabV3's image-pooling branch with its ReLU (the
    stage-5 map, 32x32 at 512x512; every stage-5 width is 16-divisible); its second product, over the
    pooled branch, is the HW = 1 classifier."""
    out = []
    for dtype, name in TRITON_DTYPE.items():
        for x_type, hw, relu in ((f"*{name}", 64, False), ("*fp32", 1, False), (f"*{name}", 1024, True)):
            BB, BHW, BK, BN, warps = _gpu_blocks(hw, dtype)
            cons = {"HAS_BIAS": True, "RELU": relu, "BB": BB, "BHW": BHW, "BK": BK, "BN": BN,
                    "PRECISION": "ieee" if dtype == torch.float32 else "tf32"}
            base = ("w_ptr", "bias_ptr", "out_ptr", "stride_wk")
            for div16, tag in ((base + ("x_ptr", "stride_xb", "stride_xh", "C"), "al"), (base, "w"))[:1 if relu else 2]:
                out.append(CompileConfig(f"pool_linear{'_relu' if relu else ''}-{name}-x{x_type[1:]}-hw{hw}-div16:{tag}",
                                                pool_linear_kernel, _signature(x_type, f"*{name}"), cons, warps, 2,
                                                aligned=div16))
    return out
