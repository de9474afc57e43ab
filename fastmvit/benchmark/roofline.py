"""The roofline of a MobileViT forward: the FLOPs it must do, the bytes it must move under a given
fusion plan, and the floor time those imply on a device.

The traffic model (per image unless said; every activation in the compute dtype, weights read once
per forward whatever the batch, since they stay in L2 between the tiles of one kernel):

``ideal``      the input image, the weights and the logits: the whole network in one kernel.
``fastmvit``   the plan the fused engine is built around (kernels/README.md and the kernel families):
               stem conv reads the NCHW image; an inverted residual is one kernel (reads its input
               once, writes its output; the expanded tensor stays on chip); LayerNorm/GroupNorm run as
               prologues of the GEMM after them (GroupNorm statistics come from the producing GEMM's
               epilogue); bias, BatchNorm (folded), SiLU and residual adds are epilogues; attention
               reads the packed qkv and writes its output (unfold/fold are index arithmetic); the v2
               context kernel reads q and k and writes [4, d]; the v1 fusion conv reads [x, y] without a
               concatenation; the last 1x1 conv (v1) pools in its epilogue, v2 pools in the classifier.
``layerwise``  every layer (convolution, linear, norm, attention) writes its output once and its
               consumers read it; element-wise work (BatchNorm, SiLU, residual add, v2's relu-scale)
               is fused into a neighbour; a GroupNorm reads its input twice (statistics, then apply).
               This is what a good per-layer compiler can reach; the issue's "write and read every
               layer's output once" bound.

Multiply-accumulates count every convolution, linear layer and attention matmul (the figures in
``fastmvit/variants.py``) plus v2's context reduction; FLOPs = 2 x MACs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

from ..errors import OptionError
from ..variants import Variant, get_variant, make_divisible

PLANS = ("ideal", "fastmvit", "layerwise")
PATCH_PIXELS = 4

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass
class Profile:
    """One forward of one image at ``size`` x ``size`` (weights separately, read once per batch)."""

    variant: str
    size: int
    macs: int = 0                  # conv + linear + attention matmuls (the variants.py figure)
    extra_macs: int = 0            # v2 context reduction, not in the variants.py figure
    weights: int = 0               # elements of the folded weights and biases
    bn_channels: int = 0           # BatchNorm channels folded away (params = weights + bn_channels)
    input: int = 0                 # elements of the image
    output: int = 1000             # logits
    traffic: Dict[str, int] = field(default_factory=lambda: {p: 0 for p in PLANS})  # activation elements
    kernels: Dict[str, int] = field(default_factory=lambda: {p: int(p == "ideal") for p in PLANS})  # launches

    @property
    def flops(self) -> int:
        return 2 * (self.macs + self.extra_macs)

    def add(self, plans, read: int, write: int, kernels: int = 1) -> None:
        for p in plans:
            self.traffic[p] += read + write
            self.kernels[p] += kernels

    def bytes(self, plan: str, batch: int, dtype: str) -> int:
        """Bytes a forward of ``batch`` images must move under ``plan``."""
        size = DTYPE_BYTES[dtype]
        per_image = self.input + self.output + (self.traffic[plan] if plan != "ideal" else 0)
        return batch * per_image * size + self.weights * size


BOTH = ("fastmvit", "layerwise")
FUSED, LAYER = ("fastmvit",), ("layerwise",)


def _conv(p: Profile, cin: int, cout: int, k: int, out_hw: int, groups: int = 1, bn: bool = True,
          bias: bool = False) -> None:
    p.macs += out_hw * cout * (cin // groups) * k * k
    p.weights += cout * (cin // groups) * k * k + (cout if (bn or bias) else 0)
    p.bn_channels += cout if bn else 0


def _inverted_residual(p: Profile, cin: int, cout: int, stride: int, expand: float, hw: int) -> int:
    hidden = make_divisible(int(round(cin * expand)), 8)
    out_hw = hw // (stride * stride)
    _conv(p, cin, hidden, 1, hw)
    _conv(p, hidden, hidden, 3, out_hw, groups=hidden)
    _conv(p, hidden, cout, 1, out_hw)
    residual = stride == 1 and cin == cout
    p.add(FUSED, cin * hw, cout * out_hw)
    p.add(LAYER, cin * hw, hidden * hw)                                  # expand
    p.add(LAYER, hidden * hw, hidden * out_hw)                           # depthwise
    p.add(LAYER, hidden * out_hw + (cin * hw if residual else 0), cout * out_hw)  # project (+ residual)
    return out_hw


def _v1_block(p: Profile, c: int, spec, hw: int) -> None:
    d, f = spec.dim, spec.ffn_dim
    n = hw // PATCH_PIXELS
    _conv(p, c, c, 3, hw)
    p.add(BOTH, c * hw, c * hw)                       # local 3x3
    _conv(p, c, d, 1, hw, bn=False)
    p.add(BOTH, c * hw, d * hw)                       # 1x1 to the token width
    for _ in range(spec.depth):
        p.macs += hw * d * 3 * d + 2 * PATCH_PIXELS * n * n * d + hw * d * d + 2 * hw * d * f
        p.weights += 2 * d + (3 * d * d + 3 * d) + (d * d + d) + 2 * d + (d * f + f) + (f * d + d)
        p.add(LAYER, d * hw, d * hw)                  # LayerNorm 1
        p.add(BOTH, d * hw, 3 * d * hw)               # qkv (LN prologue in the fused plan)
        p.add(BOTH, 3 * d * hw, d * hw)               # attention
        p.add(BOTH, 2 * d * hw, d * hw)               # out projection + residual
        p.add(LAYER, d * hw, d * hw)                  # LayerNorm 2
        p.add(BOTH, d * hw, f * hw)                   # fc1 + SiLU
        p.add(BOTH, (f + d) * hw, d * hw)             # fc2 + residual
    p.weights += 2 * d
    p.add(LAYER, d * hw, d * hw)                      # final LayerNorm
    _conv(p, d, c, 1, hw)
    p.add(BOTH, d * hw, c * hw)                       # projection back to c
    _conv(p, 2 * c, c, 3, hw)
    p.add(BOTH, 2 * c * hw, c * hw)                   # fusion conv on [x, y]


def _v2_block(p: Profile, c: int, spec, hw: int) -> None:
    d, f = spec.dim, spec.ffn_dim
    _conv(p, c, c, 3, hw, groups=c)
    p.add(BOTH, c * hw, c * hw)                       # depthwise 3x3
    _conv(p, c, d, 1, hw, bn=False)
    p.add(BOTH, c * hw, d * hw)                       # 1x1 (emits GroupNorm statistics when fused)
    for _ in range(spec.depth):
        p.macs += hw * d * (2 * d + 1) + hw * d * d + 2 * hw * d * f
        p.extra_macs += hw * d                        # context vector: sum_n softmax(q)_n * k_n
        p.weights += 2 * d + (d * (2 * d + 1) + 2 * d + 1) + (d * d + d) + 2 * d + (d * f + f) + (f * d + d)
        p.add(LAYER, 2 * d * hw, d * hw)              # GroupNorm 1: statistics pass + apply
        p.add(BOTH, d * hw, (2 * d + 1) * hw)         # qkv
        p.add(BOTH, (d + 1) * hw, PATCH_PIXELS * d)   # context vector from q and k
        p.add(BOTH, 2 * d * hw, d * hw)               # relu(v) * context -> out projection + residual
        p.add(LAYER, 2 * d * hw, d * hw)              # GroupNorm 2
        p.add(BOTH, d * hw, f * hw)                   # fc1 + SiLU
        p.add(BOTH, (f + d) * hw, d * hw)             # fc2 + residual
    p.weights += 2 * d
    p.add(LAYER, 2 * d * hw, d * hw)                  # final GroupNorm
    _conv(p, d, c, 1, hw)
    p.add(BOTH, d * hw, c * hw)                       # projection back to c (no activation)


def profile(variant, size: int = 256) -> Profile:
    """FLOPs, folded weights and activation traffic of one image through ``variant`` at size x size.
    ``size`` must be a multiple of 64 (256, 384, 512 ...), so that every stage map is even and the 2x2
    patches need no resizing, which this model does not count."""
    v: Variant = get_variant(variant)
    if size % 64:
        raise OptionError(f"the roofline model takes sizes that are multiples of 64, got {size}")
    p = Profile(v.name, size, input=3 * size * size)
    hw = (size // 2) ** 2
    _conv(p, 3, v.stem_channels, 3, hw)
    p.add(BOTH, 0, v.stem_channels * hw)                               # stem (image read: Profile.input)
    c = v.stem_channels
    for stage in v.stages:
        for j in range(stage.num_ir):
            hw = _inverted_residual(p, c, stage.out_channels, stage.stride if j == 0 else 1, stage.expand, hw)
            c = stage.out_channels
        if stage.transformer is not None:
            (_v1_block if v.family == "v1" else _v2_block)(p, c, stage.transformer, hw)
    if v.final_conv_channels:                                    # v1: 1x1 expansion before pooling
        f = v.final_conv_channels
        _conv(p, c, f, 1, hw)
        p.add(FUSED, c * hw, f)                                      # the pool is its epilogue
        p.add(LAYER, c * hw, f * hw)
        p.add(LAYER, f * hw, f)                                      # mean pool
        p.add(BOTH, f, 0)                                            # classifier (logits: Profile.output)
        c = f
    else:                                                            # v2: pool the last stage directly
        p.add(FUSED, c * hw, 0)                                      # pool + classifier in one kernel
        p.add(LAYER, c * hw, c)                                      # mean pool
        p.add(LAYER, c, 0)                                           # classifier
    p.macs += c * 1000
    p.weights += c * 1000 + 1000
    return p


def floor(p: Profile, plan: str, batch: int, dtype: str, peak: dict) -> Optional[dict]:
    """The floor time of ``batch`` images under ``plan`` on a device with ``peak`` (see ``peaks``):
    max(FLOPs / peak FLOP/s, bytes / peak bandwidth). None when the peak for ``dtype`` is unknown."""
    tflops = (peak.get("tflops") or {}).get(dtype)
    bw = peak.get("bandwidth_GBps")
    if not tflops or not bw:
        return None
    t_compute = batch * p.flops / (tflops * 1e12)
    nbytes = p.bytes(plan, batch, dtype)
    t_memory = nbytes / (bw * 1e9)
    return {"ms": max(t_compute, t_memory) * 1e3, "bound": "memory" if t_memory >= t_compute else "compute",
            "bytes": nbytes}


def roofline_row(variant, batch: int, dtype: str, peak: dict, size: int = 256) -> dict:
    """Everything the report shows about one (variant, batch, dtype): GFLOP, MB moved and floor time per
    plan, and the number of kernel launches each plan needs."""
    p = profile(variant, size)
    row = {"variant": p.variant, "batch": batch, "dtype": dtype, "size": size,
           "gflop": batch * p.flops / 1e9, "weights_mb": p.weights * DTYPE_BYTES[dtype] / 1e6,
           "mb": {}, "floor_ms": {}, "bound": {}, "kernels": dict(p.kernels)}
    for plan in PLANS:
        row["mb"][plan] = p.bytes(plan, batch, dtype) / 1e6
        f = floor(p, plan, batch, dtype, peak)
        if f is not None:
            row["floor_ms"][plan], row["bound"][plan] = f["ms"], f["bound"]
    return row
