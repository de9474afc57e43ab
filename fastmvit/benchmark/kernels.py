"""Kernel microbenchmarks: each fused op of ``fastmvit.ops`` against the eager ops it replaces (its
``*_reference``, fed the same arguments), timed with ``triton.testing.do_bench`` (L2 flushed between
calls), with achieved GB/s and TFLOP/s against the device's peak.

Shapes are the released models' at 256x256 and ``batch`` images. FLOPs count multiply-adds x 2; bytes
are the minimum an op must move (its inputs once, its output once, its weights once).

Each family's adapter below is the one place that knows its op's calling convention (the kernel briefs'
documented APIs). An op that is not importable yet, or whose arguments no longer match, is reported as
unavailable with the reason; it never fails the run.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch

from ..variants import get_variant, make_divisible

GPU_ONLY = ("Triton kernels on the CPU run under the interpreter, whose times mean nothing: "
            "kernel microbenchmarks need a CUDA device")


@dataclass
class KernelCase:
    """One op at one shape: ``make(device, dtype)`` returns (fused_fn, eager_fn), both argument-free."""

    family: str
    name: str
    flops: int
    bytes_per_elem: Callable[[int], int]   # dtype size -> bytes moved
    make: Callable[[torch.device, torch.dtype], tuple]

    def nbytes(self, dtype: torch.dtype) -> int:
        return self.bytes_per_elem(torch.empty((), dtype=dtype).element_size())


def _op(module: str, *names: str):
    """The first of ``names`` that ``fastmvit.ops.<module>`` defines; ImportError/AttributeError say why not."""
    mod = importlib.import_module(f"fastmvit.ops.{module}")
    for name in names:
        if hasattr(mod, name):
            return getattr(mod, name)
    raise AttributeError(f"fastmvit.ops.{module} defines none of {names}")


def _rand(*shape, device, dtype, scale=1.0):
    return (torch.randn(*shape, device=device, dtype=torch.float32) * scale).to(dtype)


# --------------------------------------------------------------------------------------------------
# Adapters, one per family
# --------------------------------------------------------------------------------------------------

def _attention(B, H, W, d, heads=4):
    """v1: softmax(q k^T / sqrt(hd)) v over the 2x2-patch sequences of a [B, H, W, 3d] qkv map."""
    n = H * W // 4

    def make(device, dtype):
        fused, ref = _op("attention", "patch_attention"), _op("attention", "patch_attention_reference")
        qkv = _rand(B, H, W, 3 * d, device=device, dtype=dtype)
        return (lambda: fused(qkv, heads)), (lambda: ref(qkv, heads))

    return KernelCase("attention", f"B{B}-H{H}W{W}-d{d}-h{heads}", 16 * B * n * n * d,
                      lambda s: B * H * W * 4 * d * s, make)


def _sepattn(B, H, W, d):
    """v2: context vector cv[b, p, :] = sum_n softmax_n(q) k_n from a [B, H, W, 1 + 2d] qkv map."""
    def make(device, dtype):
        fused, ref = _op("sepattn", "sepattn_context"), _op("sepattn", "sepattn_context_reference")
        qkv = _rand(B, H, W, 1 + 2 * d, device=device, dtype=dtype)
        return (lambda: fused(qkv, d)), (lambda: ref(qkv, d, H, W))

    return KernelCase("sepattn", f"B{B}-H{H}W{W}-d{d}", 2 * B * H * W * d,
                      lambda s: B * H * W * (1 + d) * s + B * 4 * d * 4, make)


def _dwconv(B, H, W, C, stride):
    """Depthwise 3x3 + folded BN + SiLU, NHWC (IR blocks on the expanded map; v2 blocks' local conv)."""
    Ho, Wo = (H + stride - 1) // stride, (W + stride - 1) // stride

    def make(device, dtype):
        fused, ref = _op("dwconv", "dwconv3x3"), _op("dwconv", "dwconv3x3_reference")
        w, b = (t.to(device) for t in _op("dwconv", "pack_dwconv3x3")(torch.randn(C, 1, 3, 3) / 3,
                                                                      torch.randn(C) * 0.1))
        x = _rand(B, H, W, C, device=device, dtype=dtype)
        kw = dict(stride=stride, dilation=1, act=True)
        return (lambda: fused(x, w, b, **kw)), (lambda: ref(x, w, b, **kw))

    return KernelCase("dwconv", f"B{B}-H{H}W{W}-C{C}-s{stride}", 2 * 9 * B * Ho * Wo * C,
                      lambda s: (B * H * W * C + B * Ho * Wo * C) * s + 10 * C * 4, make)


def _conv3x3(B, H, W, cin, cout, stride, two_inputs=False, nchw=False):
    """Dense 3x3 implicit GEMM: the stem (reads the NCHW image), v1's local conv, v1's fusion conv on
    [x, x2] without the concatenation."""
    Ho, Wo = (H + stride - 1) // stride, (W + stride - 1) // stride
    c1 = cin // 2 if two_inputs else cin

    def make(device, dtype):
        fused, ref = _op("conv", "conv3x3"), _op("conv", "conv3x3_reference")
        w, b = (t.to(device) for t in _op("conv", "pack_conv3x3")(torch.randn(cout, cin, 3, 3) / (3 * cin ** 0.5),
                                                                   torch.randn(cout) * 0.1, dtype))
        x = _rand(*((B, cin, H, W) if nchw else (B, H, W, c1)), device=device, dtype=dtype)
        kw = dict(stride=stride, act=True, input_nchw=nchw)
        if two_inputs:
            kw["x2"] = _rand(B, H, W, cin - c1, device=device, dtype=dtype)
        return (lambda: fused(x, w, b, **kw)), (lambda: ref(x, w, b, **kw))

    tag = "-nchw" if nchw else ("-x2" if two_inputs else "")
    return KernelCase("conv", f"B{B}-H{H}W{W}-{cin}to{cout}-s{stride}{tag}", 2 * 9 * B * Ho * Wo * cin * cout,
                      lambda s: (B * H * W * cin + B * Ho * Wo * cout + 9 * cin * cout) * s + cout * 4, make)


def _inverted_residual(B, H, W, cin, hidden, cout, stride):
    """The whole MobileNetV2 block in one kernel (``fused=True``) against eager convolutions."""
    Ho, Wo = H // stride, W // stride

    def make(device, dtype):
        fused, ref = _op("mv2_block", "inverted_residual"), _op("mv2_block", "inverted_residual_reference")
        g = lambda *shape, fan: torch.randn(*shape) * fan ** -0.5  # noqa: E731
        p = _op("mv2_block", "pack_inverted_residual")(
            g(hidden, cin, 1, 1, fan=cin), torch.randn(hidden) * 0.1, g(hidden, 1, 3, 3, fan=9),
            torch.randn(hidden) * 0.1, g(cout, hidden, 1, 1, fan=hidden), torch.randn(cout) * 0.1,
            stride=stride, dtype=dtype)
        p = type(p)(**{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in vars(p).items()})
        x = _rand(B, H, W, cin, device=device, dtype=dtype)
        return (lambda: fused(x, p, fused=True)), (lambda: ref(x, p))

    macs = B * (H * W * cin * hidden + Ho * Wo * hidden * 9 + Ho * Wo * hidden * cout)
    return KernelCase("mv2_block", f"B{B}-H{H}W{W}-{cin}to{hidden}to{cout}-s{stride}", 2 * macs,
                      lambda s: (B * H * W * cin + B * Ho * Wo * cout + (cin + cout) * hidden) * s, make)


def _gemm(M, K, N, act=False, residual=False, layer_norm=False):
    """1x1 conv / linear with bias and optional LayerNorm prologue, SiLU and residual epilogues."""
    def make(device, dtype):
        fused, ref = _op("gemm", "linear"), _op("gemm", "linear_reference")
        weight, bias = torch.randn(N, K) * K ** -0.5, torch.randn(N) * 0.1
        norm = dict(norm_weight=torch.rand(K) + 0.5, norm_bias=torch.randn(K) * 0.1) if layer_norm else {}
        packed = _op("gemm", "pack_linear")(weight, bias, dtype=dtype, device=device, **norm)
        a = _rand(M, K, device=device, dtype=dtype)
        kw = dict(act="silu" if act else None, residual=_rand(M, N, device=device, dtype=dtype) if residual else None,
                  norm="layer" if layer_norm else None)
        w, b = weight.to(device), bias.to(device)
        norm = {k: v.to(device) for k, v in norm.items()}
        return (lambda: fused(a, packed, **kw)), (lambda: ref(a, w, b, **kw, **norm))

    tag = ("-ln" if layer_norm else "") + ("-silu" if act else "") + ("-res" if residual else "")
    return KernelCase("gemm", f"M{M}-K{K}-N{N}{tag}", 2 * M * K * N,
                      lambda s: (M * K + M * N * (2 if residual else 1) + K * N) * s + N * 4, make)


def _pool_linear(B, H, W, C, classes=1000):
    """Global mean pool + classifier -> float32 logits."""
    def make(device, dtype):
        fused, ref = _op("pool", "pool_linear"), _op("pool", "pool_linear_reference")
        weight, bias = torch.randn(classes, C) * C ** -0.5, torch.randn(classes) * 0.1
        packed = _op("gemm", "pack_linear")(weight, bias, dtype=dtype, device=device)
        x = _rand(B, H, W, C, device=device, dtype=dtype)
        w, b = weight.to(device), bias.to(device)
        return (lambda: fused(x, packed)), (lambda: ref(x, w, b))

    return KernelCase("pool", f"B{B}-H{H}W{W}-C{C}", B * H * W * C + 2 * B * C * classes,
                      lambda s: (B * H * W * C + classes * C) * s + B * classes * 4, make)


def cases(batch: int = 64, variants=("s", "v2-1.0")) -> List[KernelCase]:
    """Every op family at the shapes of ``variants`` at 256x256 (v1 attention and convolutions need a v1
    variant, the v2 context a v2 one)."""
    out: List[KernelCase] = []
    for name in variants:
        v = get_variant(name)
        side, c = 128, v.stem_channels
        out.append(_conv3x3(batch, 256, 256, 3, c, 2, nchw=True))
        for si, stage in enumerate(v.stages):
            hidden = make_divisible(int(round(c * stage.expand)), 8)
            if si < 2:  # the early, memory-bound inverted residuals, fused and in pieces
                out.append(_inverted_residual(batch, side, side, c, hidden, stage.out_channels, stage.stride))
                out.append(_gemm(batch * side * side, c, hidden, act=True))
                out.append(_dwconv(batch, side, side, hidden, stage.stride))
            side //= stage.stride
            c = stage.out_channels
            t = stage.transformer
            if t is None:
                continue
            if v.family == "v1":
                out.append(_conv3x3(batch, side, side, c, c, 1))
                out.append(_gemm(batch * side * side, t.dim, 3 * t.dim, layer_norm=True))
                out.append(_attention(batch, side, side, t.dim, t.heads))
                out.append(_gemm(batch * side * side, t.ffn_dim, t.dim, residual=True))
                out.append(_conv3x3(batch, side, side, 2 * c, c, 1, two_inputs=True))
            else:
                out.append(_dwconv(batch, side, side, c, 1))
                out.append(_sepattn(batch, side, side, t.dim))
        out.append(_pool_linear(batch, side, side, v.num_features))
    return out


def measure_case(case: KernelCase, device: torch.device, dtype: torch.dtype, peak: dict) -> dict:
    """Both implementations of one case with ``do_bench``: ms, achieved GB/s and TFLOP/s, and the share
    of the device peak the fused op reaches on the resource that bounds it."""
    dname = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}[dtype]
    row = {"family": case.family, "case": case.name, "dtype": dname, "gflop": case.flops / 1e9,
           "mb": case.nbytes(dtype) / 1e6}
    if device.type != "cuda":
        return {**row, "status": "unavailable", "reason": GPU_ONLY}
    try:
        fused, eager = case.make(device, dtype)
        out_f, out_e = fused(), eager()
    except Exception as e:  # not built yet, or its API moved: say which
        return {**row, "status": "unavailable", "reason": f"{type(e).__name__}: {e}"}
    if isinstance(out_f, torch.Tensor) and isinstance(out_e, torch.Tensor):
        row["max_abs_diff"] = (out_f.float() - out_e.float()).abs().max().item()
    from triton.testing import do_bench

    for impl, fn in (("fused", fused), ("eager", eager)):
        med, lo, hi = do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
        row[impl] = {"ms": med, "ms_q20": lo, "ms_q80": hi,
                     "GBps": case.nbytes(dtype) / med / 1e6, "TFLOPs": case.flops / med / 1e9}
    bw, tf = peak.get("bandwidth_GBps"), (peak.get("tflops") or {}).get(dname)
    if bw and tf:
        f = row["fused"]
        f["pct_bandwidth"], f["pct_flops"] = 100 * f["GBps"] / bw, 100 * f["TFLOPs"] / tf
        row["bound"] = "memory" if case.nbytes(dtype) / bw >= case.flops / (tf * 1e3) else "compute"
    row["speedup"] = row["eager"]["ms"] / row["fused"]["ms"]
    row["status"] = "ok"
    return row


def run(device: torch.device, dtype: torch.dtype, peak: dict, batch: int = 64,
        variants=("s", "v2-1.0"), only: Optional[str] = None) -> List[dict]:
    """``measure_case`` for every case (of family ``only`` if given)."""
    return [measure_case(c, device, dtype, peak) for c in cases(batch, variants) if not only or only == c.family]
