"""1x1 convolutions and linear layers as one fused GEMM: weight packing, the registered custom ops, the
public ``linear`` call and its plain-PyTorch reference.

What the engine does for one v2 transformer layer on the NHWC token matrix x [M = B*H*W, d], with s the
statistics that the GEMM producing x emitted (conv_1x1 or the previous fc2; ``pack_qkv`` and
``sepattn_context`` are in fastmvit.ops.sepattn):

    qkv_w = pack_qkv(qkv.weight, qkv.bias, norm_weight=gn1.weight, norm_bias=gn1.bias, dtype=dt, device=dev)
    qkv = linear(x, qkv_w, norm="group", group_stats=s, rows_per_sample=H * W)   # k | v | q, rows padded
    cv = sepattn_context(qkv, d, H, W, **qkv_columns(d))
    x, s = linear(qkv[:, d:2 * d], out_w, relu_scale=cv, hw=(H, W), residual=x,
                  emit_group_stats=True, rows_per_sample=H * W)
    h = linear(x, fc1_w, norm="group", group_stats=s, rows_per_sample=H * W, act="silu")
    x, s = linear(h, fc2_w, residual=x, emit_group_stats=True, rows_per_sample=H * W)

Speed: rows whose start is 16-byte aligned with a row stride that is a multiple of 16 elements (a, the
residual and y) take the vectorised, pipelined tile classes; other strides work, element by element.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.library import triton_op

from ..kernels import gemm as _k
from ._common import inference_only

__all__ = ["PackedLinear", "pack_linear", "linear", "linear_plan", "linear_reference", "group_stats_reference",
           "finalize_group_stats"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_PAD = 16  # N padded to a multiple of 16 elements: aligned, vectorisable rows of W


@dataclass(frozen=True)
class PackedLinear:
    """Weights of one GEMM as the kernel reads them.

    weight: [K, N_pad] in the compute dtype, W^T with zero columns N..N_pad (N_pad = ceil(N / 16) * 16)
    bias:   [N] float32 or None (added in fp32 in the epilogue)
    out_stride: row stride of the y that ``linear`` allocates (N, or N_pad with ``pad_output``: y is then
            a [M, N] view whose rows, and column slices at multiples of 16, stay 16-byte aligned)
    """

    weight: Tensor
    bias: Optional[Tensor]
    in_features: int
    out_features: int
    out_stride: int

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.weight.device


def pack_linear(weight: Tensor, bias: Optional[Tensor] = None, *, norm_weight: Optional[Tensor] = None,
                norm_bias: Optional[Tensor] = None, dtype: torch.dtype = torch.float32,
                device=None, pad_output: bool = False) -> PackedLinear:
    """Pack float32 (or float64) weights for ``linear``.

    weight: [N, K] (nn.Linear) or [N, K, 1, 1] (1x1 Conv2d), any BatchNorm already folded in
    bias:   [N] or None
    norm_weight, norm_bias: [K] affine of the LayerNorm / GroupNorm(1) that precedes this GEMM; folded
        here in float64 (W' = W * gamma, b' = b + W @ beta) so the kernel only normalises.
    pad_output: allocate y with rows padded to a multiple of 16 elements (see ``PackedLinear.out_stride``).
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype}")
    if weight.dim() == 4:
        if weight.shape[2:] != (1, 1):
            raise ValueError(f"a 4-D weight must be a 1x1 convolution's [N, K, 1, 1], got {tuple(weight.shape)}")
        weight = weight.flatten(1)
    if weight.dim() != 2:
        raise ValueError(f"weight must be [N, K] or [N, K, 1, 1], got {tuple(weight.shape)}")
    N, K = weight.shape
    w = weight.detach().double()
    b = bias.detach().double() if bias is not None else None
    if norm_bias is not None:
        shift = w @ norm_bias.detach().double()
        b = shift if b is None else b + shift
    if norm_weight is not None:
        w = w * norm_weight.detach().double()[None, :]
    n_pad = -(-N // _PAD) * _PAD
    wt = torch.zeros(K, n_pad, dtype=dtype, device=device if device is not None else weight.device)
    wt[:, :N] = w.t().to(dtype=dtype, device=wt.device)
    bias_out = b.to(dtype=torch.float32, device=wt.device).contiguous() if b is not None else None
    return PackedLinear(wt, bias_out, K, N, n_pad if pad_output else N)


# -- registered ops: the kernel launch as torch sees it (torch.compile, CUDA graphs, export) -------------

@triton_op("fastmvit::linear", mutates_args={})
def _linear_op(a: Tensor, w: Tensor, n_out: int, bias: Optional[Tensor], residual: Optional[Tensor],
               act: bool, norm: int, group_stats: Optional[Tensor], rows_per_sample: int,
               relu_scale: Optional[Tensor], height: int, width: int, eps: float, out_stride: int) -> Tensor:
    return _k.gemm(a, w, n_out, bias=bias, act=act, residual=residual, norm=norm, group_stats=group_stats,
                   rows_per_sample=rows_per_sample, relu_scale=relu_scale, hw=(height, width), eps=eps,
                   out_stride=out_stride)


@triton_op("fastmvit::linear_group_stats", mutates_args={})
def _linear_stats_op(a: Tensor, w: Tensor, n_out: int, bias: Optional[Tensor], residual: Optional[Tensor],
                     act: bool, norm: int, group_stats: Optional[Tensor], rows_per_sample: int,
                     relu_scale: Optional[Tensor], height: int, width: int, eps: float,
                     out_stride: int) -> Tuple[Tensor, Tensor]:
    return _k.gemm(a, w, n_out, bias=bias, act=act, residual=residual, norm=norm, group_stats=group_stats,
                   rows_per_sample=rows_per_sample, relu_scale=relu_scale, hw=(height, width), eps=eps,
                   out_stride=out_stride, emit_stats=True)


@triton_op("fastmvit::linear_pool", mutates_args={})
def _linear_pool_op(a: Tensor, w: Tensor, n_out: int, bias: Optional[Tensor], residual: Optional[Tensor],
                    act: bool, norm: int, group_stats: Optional[Tensor], rows_per_sample: int,
                    relu_scale: Optional[Tensor], height: int, width: int, eps: float,
                    out_stride: int) -> Tensor:
    return _k.gemm(a, w, n_out, bias=bias, act=act, residual=residual, norm=norm, group_stats=group_stats,
                   rows_per_sample=rows_per_sample, relu_scale=relu_scale, hw=(height, width), eps=eps,
                   pool=True)


for _op, _name in ((_linear_op, "fastmvit::linear"), (_linear_stats_op, "fastmvit::linear_group_stats"),
                  (_linear_pool_op, "fastmvit::linear_pool")):
    inference_only(_op, _name)


def _row_view(t: Tensor, name: str) -> Tensor:
    if t.dim() != 2:
        raise ValueError(f"{name} must be a 2-D [rows, channels] view, got shape {tuple(t.shape)}")
    return t if t.stride(1) == 1 else t.contiguous()  # the kernel needs unit column stride only


def _resolve(a: Tensor, packed: PackedLinear, act, residual, norm, group_stats, rows_per_sample, relu_scale,
             hw, emit_group_stats, pool, eps) -> tuple:
    """``linear``'s checks; returns the registered op's arguments (tensors made kernel-ready)."""
    a = _row_view(a, "a")
    M, K = a.shape
    if M == 0:
        raise ValueError("a has no rows")
    if a.dtype != packed.dtype or a.device != packed.device:
        raise ValueError(f"a ({a.dtype}, {a.device}) must match the packed weights ({packed.dtype}, {packed.device})")
    if K != packed.in_features:
        raise ValueError(f"a has {K} channels, the weights expect {packed.in_features}")
    if act not in (None, "silu"):
        raise ValueError(f"act must be None or 'silu', got {act!r}")
    if norm not in (None, "layer", "group"):
        raise ValueError(f"norm must be None, 'layer' or 'group', got {norm!r}")
    if emit_group_stats and pool:
        raise ValueError("emit_group_stats and pool exclude each other (pool writes no y)")
    if norm is not None and relu_scale is not None:
        raise ValueError("norm and relu_scale are separate prologues; pass one")
    rps = 0
    if norm == "group" or emit_group_stats or pool:
        if not rows_per_sample or M % rows_per_sample:
            raise ValueError(f"rows_per_sample must divide M = {M}, got {rows_per_sample}")
        rps = int(rows_per_sample)
    B = M // rps if rps else 0
    if norm == "group":
        if group_stats is None or group_stats.dim() != 3 or group_stats.shape[:2] != (B, 3) \
                or group_stats.dtype != torch.float32:
            raise ValueError(f"norm='group' needs group_stats [B={B}, 3, T] float32 from emit_group_stats, "
                             f"got {None if group_stats is None else (tuple(group_stats.shape), group_stats.dtype)}")
        group_stats = group_stats.contiguous()
    H = W = 0
    if relu_scale is not None:
        if hw is None or len(hw) != 2 or hw[0] % 2 or hw[1] % 2 or M % (hw[0] * hw[1]):
            raise ValueError(f"relu_scale needs hw = (H, W), both even, H*W dividing M = {M}; got {hw}")
        H, W = int(hw[0]), int(hw[1])
        if relu_scale.shape != (M // (H * W), 4, K) or relu_scale.dtype != torch.float32:
            raise ValueError(f"relu_scale must be [B, 4, K] = {(M // (H * W), 4, K)} float32, "
                             f"got {tuple(relu_scale.shape)} {relu_scale.dtype}")
        relu_scale = relu_scale.contiguous()
    N = packed.out_features
    if residual is not None:
        residual = _row_view(residual, "residual")
        if residual.shape != (M, N):
            raise ValueError(f"residual must be [M, N] = {(M, N)}, got {tuple(residual.shape)}")
    return (a, packed.weight, N, packed.bias, residual, act == "silu",
            {None: _k.NORM_NONE, "layer": _k.NORM_LAYER, "group": _k.NORM_GROUP}[norm],
            group_stats, rps, relu_scale, H, W, float(eps), packed.out_stride)


def linear(a: Tensor, packed: PackedLinear, *, act: Optional[str] = None, residual: Optional[Tensor] = None,
           norm: Optional[str] = None, group_stats: Optional[Tensor] = None,
           rows_per_sample: Optional[int] = None, relu_scale: Optional[Tensor] = None,
           hw: Optional[Tuple[int, int]] = None, emit_group_stats: bool = False, pool: bool = False,
           eps: float = 1e-5):
    """y = epilogue(prologue(a) @ W^T): a 1x1 convolution / linear layer on a token matrix, fused.

    a:        [M, K] in packed.dtype; column stride 1, any row stride (a column slice of a wider buffer
              is read in place)
    act:      None or "silu", applied after the bias
    residual: [M, N], any float dtype, column stride 1; added after the activation
    norm:     None; "layer" (LayerNorm over K per row, eps, affine folded into ``packed``); or "group"
              (GroupNorm(1) per sample from ``group_stats``, the partials a previous ``linear`` emitted
              with emit_group_stats=True for the same rows_per_sample)
    rows_per_sample: rows of one sample (H*W); M must be a multiple. Needed by norm="group",
              emit_group_stats and pool
    relu_scale: [B, 4, K] float32 context from ``sepattn_context``: the GEMM reads
              relu(a[m, k]) * relu_scale[m // (H*W), (h % 2) * 2 + w % 2, k] for pixel (h, w) of row m
    hw:       (H, W) of the NHWC map the rows enumerate (both even); needed by relu_scale
    emit_group_stats: also return [B, 3, T] float32 partial statistics (count, mean, M2 per output tile)
              of y as stored, for a following norm="group" consumer
    pool:     return the per-sample mean over rows, [B, N] float32, instead of y

    Returns y [M, N] in a.dtype (row stride packed.out_stride); (y, stats) with emit_group_stats;
    [B, N] float32 with pool.
    """
    args = _resolve(a, packed, act, residual, norm, group_stats, rows_per_sample, relu_scale, hw,
                    emit_group_stats, pool, eps)
    if pool:
        return torch.ops.fastmvit.linear_pool(*args)
    if emit_group_stats:
        return torch.ops.fastmvit.linear_group_stats(*args)
    return torch.ops.fastmvit.linear(*args)


class LinearPlan:
    """``linear`` resolved once for one signature (see ``linear_plan``): called with the same arguments as
    ``linear``, it allocates and launches directly, without the custom-op dispatch."""

    __slots__ = ("gemm", "copies")

    def __init__(self, gemm, copies: bool):
        self.gemm, self.copies = gemm, copies

    def __call__(self, a: Tensor, packed: PackedLinear, *, residual: Optional[Tensor] = None,
                 group_stats: Optional[Tensor] = None, relu_scale: Optional[Tensor] = None, **_):
        if self.copies:  # a layout the kernel cannot read in place (never in the engine): as linear does
            a, residual = _row_view(a, "a"), None if residual is None else _row_view(residual, "residual")
            group_stats = None if group_stats is None else group_stats.contiguous()
            relu_scale = None if relu_scale is None else relu_scale.contiguous()
        return self.gemm(a, packed.weight, packed.bias, residual, group_stats, relu_scale)


def linear_plan(a: Tensor, packed: PackedLinear, *, act: Optional[str] = None, residual: Optional[Tensor] = None,
                norm: Optional[str] = None, group_stats: Optional[Tensor] = None,
                rows_per_sample: Optional[int] = None, relu_scale: Optional[Tensor] = None,
                hw: Optional[Tuple[int, int]] = None, emit_group_stats: bool = False, pool: bool = False,
                eps: float = 1e-5) -> LinearPlan:
    """``linear``'s checks and launch configuration, done once for tensors with these shapes, strides,
    dtypes and devices: the returned plan computes ``linear(a, packed, ...)`` for any such tensors."""
    args = _resolve(a, packed, act, residual, norm, group_stats, rows_per_sample, relu_scale, hw,
                    emit_group_stats, pool, eps)
    a2, w, N, bias, res2, silu, norm_id, gs2, rps, cv2, H, W, eps_f, out_stride = args
    copies = a2 is not a or res2 is not residual or gs2 is not group_stats or cv2 is not relu_scale
    plan = _k.gemm_plan(a2, w, N, has_bias=bias is not None, act=silu, residual=res2, norm=norm_id,
                        group_stats=gs2, rows_per_sample=rps, has_relu_scale=cv2 is not None, hw=(H, W),
                        emit_stats=emit_group_stats, pool=pool, eps=eps_f, out_stride=out_stride)
    return LinearPlan(plan, copies)


# -- references ------------------------------------------------------------------------------------------

def _patch_pos(M: int, H: int, W: int, device) -> Tuple[Tensor, Tensor]:
    m = torch.arange(M, device=device)
    pix = m % (H * W)
    return m // (H * W), (pix // W % 2) * 2 + pix % W % 2


def linear_reference(a: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *, act: Optional[str] = None,
                     residual: Optional[Tensor] = None, norm: Optional[str] = None,
                     norm_weight: Optional[Tensor] = None, norm_bias: Optional[Tensor] = None,
                     rows_per_sample: Optional[int] = None, relu_scale: Optional[Tensor] = None,
                     hw: Optional[Tuple[int, int]] = None, pool: bool = False, eps: float = 1e-5) -> Tensor:
    """What ``linear`` computes, unfused, in a's dtype (weights, affine and context are cast to it).

    weight [N, K] or [N, K, 1, 1] and bias [N] unpacked; norm_weight / norm_bias the LN / GN affine.
    GroupNorm statistics are computed from ``a`` itself (the kernel gets them from the producer).
    Returns [M, N] in a.dtype, or [B, N] float32 with pool.
    """
    dt = a.dtype

    def cast(t):
        return None if t is None else t.to(dtype=dt, device=a.device)

    weight = weight.flatten(1)
    x = a
    M, K = a.shape
    if norm == "layer":
        x = F.layer_norm(x, (K,), cast(norm_weight), cast(norm_bias), eps)
    elif norm == "group":
        B = M // rows_per_sample
        x = F.group_norm(x.reshape(B, rows_per_sample, K).transpose(1, 2), 1, cast(norm_weight),
                         cast(norm_bias), eps).transpose(1, 2).reshape(M, K)
    if relu_scale is not None:
        b, p = _patch_pos(M, hw[0], hw[1], a.device)
        x = F.relu(x) * cast(relu_scale)[b, p]
    y = F.linear(x, cast(weight), cast(bias))
    if act == "silu":
        y = F.silu(y)
    if residual is not None:
        y = y + residual.to(dt)
    if pool:
        return y.reshape(M // rows_per_sample, rows_per_sample, -1).mean(1).float()
    return y


def group_stats_reference(y: Tensor, rows_per_sample: int) -> Tuple[Tensor, Tensor]:
    """Per-sample (mean, biased variance) of y [M, N] over rows_per_sample * N elements, float64."""
    v = y.double().reshape(-1, rows_per_sample * y.shape[1])
    return v.mean(1), v.var(1, unbiased=False)


def finalize_group_stats(stats: Tensor) -> Tuple[Tensor, Tensor]:
    """Merge [B, 3, T] partials (count, mean, M2) into per-sample (mean, biased variance), float64:
    what the GroupNorm prologue computes, for tests and debugging."""
    n, mu, m2 = stats.double().unbind(1)
    total = n.sum(1)
    mean = (n * mu).sum(1) / total
    return mean, (m2.sum(1) + (n * (mu - mean[:, None]) ** 2).sum(1)) / total
