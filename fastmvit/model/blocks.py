"""The blocks of MobileViT v1 and v2 as plain PyTorch: the reference path.

Module and parameter names follow timm's, so a timm state dict loads without renaming and every other
layout is mapped onto these names (``fastmvit.weights.layouts``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..variants import TransformerSpec, make_divisible
from .layers import Activation, ConvNormAct, Numerics

__all__ = [
    "InvertedResidual", "Attention", "TransformerLayer", "MobileViTBlock",
    "SeparableAttention", "LinearTransformerLayer", "MobileViTv2Block", "unfold_patches", "fold_patches",
]

PATCH = 2  # every released MobileViT uses 2x2 patches


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand + SiLU, 3x3 depthwise + SiLU, 1x1 project; residual when shapes allow."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expand: float):
        super().__init__()
        hidden = make_divisible(int(round(in_ch * expand)), 8)
        self.conv1_1x1 = ConvNormAct(in_ch, hidden, 1)
        self.conv2_kxk = ConvNormAct(hidden, hidden, 3, stride, groups=hidden)
        self.conv3_1x1 = ConvNormAct(hidden, out_ch, 1, act=False)
        self.has_residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv3_1x1(self.conv2_kxk(self.conv1_1x1(x)))
        return x + y if self.has_residual else y


# --------------------------------------------------------------------------------------------------
# MobileViT v1
# --------------------------------------------------------------------------------------------------

def unfold_patches(y: torch.Tensor) -> torch.Tensor:
    """[B, d, 2*nh, 2*nw] -> [B*4, nh*nw, d]: row ``b*4 + i*2 + j`` holds pixel (i, j) of every patch."""
    B, d, H, W = y.shape
    nh, nw = H // PATCH, W // PATCH
    return y.reshape(B, d, nh, PATCH, nw, PATCH).permute(0, 3, 5, 2, 4, 1).reshape(B * PATCH * PATCH, nh * nw, d)


def fold_patches(t: torch.Tensor, batch: int, nh: int, nw: int) -> torch.Tensor:
    """Exact inverse of ``unfold_patches``: [B*4, nh*nw, d] -> [B, d, 2*nh, 2*nw]."""
    d = t.shape[-1]
    return t.reshape(batch, PATCH, PATCH, nh, nw, d).permute(0, 5, 3, 1, 4, 2).reshape(
        batch, d, nh * PATCH, nw * PATCH)


class Attention(nn.Module):
    """Multi-head self-attention with a packed qkv projection (rows q | k | v, heads contiguous)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.numerics = Numerics()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return self.attend(*qkv.unbind(0))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention of the heads' q, k, v [B, heads, N, head_dim], then the output projection: [B, N, C]."""
        B, _, N, _ = q.shape
        mode = self.numerics.attention
        if mode == "sdpa":
            o = F.scaled_dot_product_attention(q, k, v)
        else:
            if mode == "prescale":
                scores = (q * self.head_dim ** -0.5) @ k.transpose(-2, -1)
            else:
                scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)
            o = scores.softmax(dim=-1) @ v
        return self.proj(o.transpose(1, 2).reshape(B, N, self.heads * self.head_dim))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, conv: bool = False):
        super().__init__()
        layer = (lambda i, o: nn.Conv2d(i, o, 1)) if conv else nn.Linear
        self.fc1 = layer(dim, hidden)
        self.act = Activation()
        self.fc2 = layer(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class TransformerLayer(nn.Module):
    """Pre-norm transformer layer on [B*4, N, d] token sequences."""

    def __init__(self, spec: TransformerSpec):
        super().__init__()
        self.norm1 = nn.LayerNorm(spec.dim, eps=1e-5)
        self.attn = Attention(spec.dim, spec.heads)
        self.norm2 = nn.LayerNorm(spec.dim, eps=1e-5)
        self.mlp = Mlp(spec.dim, spec.ffn_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class MobileViTBlock(nn.Module):
    """v1: local 3x3 + 1x1, unfold to 2x2-patch sequences, transformer, fold, 1x1 projection, and a 3x3
    fusion of [input, projection]. Odd maps are resized to even (bilinear, align_corners=False) around
    the transformer and back, as all four implementations do."""

    def __init__(self, channels: int, spec: TransformerSpec):
        super().__init__()
        self.conv_kxk = ConvNormAct(channels, channels, 3)
        self.conv_1x1 = nn.Conv2d(channels, spec.dim, 1, bias=False)
        self.transformer = nn.Sequential(*[TransformerLayer(spec) for _ in range(spec.depth)])
        self.norm = nn.LayerNorm(spec.dim, eps=1e-5)
        self.conv_proj = ConvNormAct(spec.dim, channels, 1)
        self.conv_fusion = ConvNormAct(2 * channels, channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv_1x1(self.conv_kxk(x))
        B, _, H, W = y.shape
        nh, nw = math.ceil(H / PATCH), math.ceil(W / PATCH)
        resized = (nh * PATCH, nw * PATCH) != (H, W)
        if resized:
            y = F.interpolate(y, size=(nh * PATCH, nw * PATCH), mode="bilinear", align_corners=False)
        t = self.norm(self.transformer(unfold_patches(y)))
        y = fold_patches(t, B, nh, nw)
        if resized:
            y = F.interpolate(y, size=(H, W), mode="bilinear", align_corners=False)
        y = self.conv_proj(y)
        return self.conv_fusion(torch.cat([x, y], dim=1))


# --------------------------------------------------------------------------------------------------
# MobileViT v2
# --------------------------------------------------------------------------------------------------

class SeparableAttention(nn.Module):
    """Linear-complexity attention of MobileViTv2 on [B, d, P, N] (P pixels per patch, N patches)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.qkv_proj = nn.Conv2d(dim, 1 + 2 * dim, 1)
        self.out_proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attend(*self.qkv_proj(x).split([1, self.dim, self.dim], dim=1))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The attention after the projection: q [B, 1, P, N], k and v [B, d, P, N]."""
        scores = F.softmax(q, dim=-1)                         # over the N patches, per pixel position
        context = (k * scores).sum(dim=-1, keepdim=True)      # [B, d, P, 1]
        return self.out_proj(F.relu(v) * context.expand_as(v))


class LinearTransformerLayer(nn.Module):
    """Pre-norm v2 layer; GroupNorm(1) normalises over all d*P*N elements of a sample."""

    def __init__(self, spec: TransformerSpec):
        super().__init__()
        self.norm1 = nn.GroupNorm(1, spec.dim, eps=1e-5)
        self.attn = SeparableAttention(spec.dim)
        self.norm2 = nn.GroupNorm(1, spec.dim, eps=1e-5)
        self.mlp = Mlp(spec.dim, spec.ffn_dim, conv=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class MobileViTv2Block(nn.Module):
    """v2: depthwise 3x3 + 1x1, unfold to [B, d, 4, N], separable-attention layers, fold, 1x1 conv + BN."""

    def __init__(self, channels: int, spec: TransformerSpec):
        super().__init__()
        self.conv_kxk = ConvNormAct(channels, channels, 3, groups=channels)
        self.conv_1x1 = nn.Conv2d(channels, spec.dim, 1, bias=False)
        self.transformer = nn.Sequential(*[LinearTransformerLayer(spec) for _ in range(spec.depth)])
        self.norm = nn.GroupNorm(1, spec.dim, eps=1e-5)
        self.conv_proj = ConvNormAct(spec.dim, channels, 1, act=False)
        self.numerics = Numerics()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2:]
        hf_odd = self.numerics.v2_odd_size == "hf"
        if (H % PATCH or W % PATCH) and not hf_odd:
            # ml-cvnets/timm enlarge the block input and keep the enlarged size downstream
            x = F.interpolate(x, size=(math.ceil(H / PATCH) * PATCH, math.ceil(W / PATCH) * PATCH),
                              mode="bilinear", align_corners=True)
            H, W = x.shape[-2:]
        y = self.conv_1x1(self.conv_kxk(x))
        B, d = y.shape[:2]
        nh, nw = H // PATCH, W // PATCH
        if hf_odd:  # HF: unfold drops a trailing odd row/column, fold leaves zeros there
            y = y[:, :, : nh * PATCH, : nw * PATCH]
        p = y.reshape(B, d, nh, PATCH, nw, PATCH).permute(0, 1, 3, 5, 2, 4).reshape(B, d, PATCH * PATCH, nh * nw)
        p = self.norm(self.transformer(p))
        y = p.reshape(B, d, PATCH, PATCH, nh, nw).permute(0, 1, 4, 2, 5, 3).reshape(B, d, nh * PATCH, nw * PATCH)
        if hf_odd and (H, W) != (nh * PATCH, nw * PATCH):
            y = F.pad(y, (0, W - nw * PATCH, 0, H - nh * PATCH))
        return self.conv_proj(y)
