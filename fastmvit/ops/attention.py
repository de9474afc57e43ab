"""``fastmvit::patch_attention``: MobileViT v1 multi-head attention on the 2x2-patch sequences of an NHWC
qkv map (unfold, attention and fold in one Triton kernel), and its plain-PyTorch reference.

    torch.ops.fastmvit.patch_attention(qkv, heads) -> out
    qkv: [B, H, W, 3*d] float32/float16/bfloat16 (H, W even; channels q | k | v, heads contiguous in each)
    out: [B, H, W, d], same dtype; inference only (a gradient through it raises).
"""
from __future__ import annotations

import torch

from ..kernels import attention as _kernels
from ._common import inference_only
from ..model.blocks import fold_patches, unfold_patches

__all__ = ["patch_attention", "patch_attention_plan", "patch_attention_reference"]


def patch_attention_reference(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    """The eager way, in ``qkv``'s dtype: unfold to [B*4, N, 3d] sequences, softmax((q * hd**-0.5) @ k^T) @ v
    per head (as ml-cvnets and timm with fused attention off), fold back. Shapes as ``patch_attention``."""
    B, H, W, C3 = qkv.shape
    d = C3 // 3
    hd = d // heads
    t = unfold_patches(qkv.permute(0, 3, 1, 2))                       # [B*4, N, 3d]
    S, N = t.shape[:2]
    q, k, v = t.reshape(S, N, 3, heads, hd).permute(2, 0, 3, 1, 4).unbind(0)
    o = ((q * hd ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1) @ v  # [B*4, heads, N, hd]
    o = fold_patches(o.transpose(1, 2).reshape(S, N, d), B, H // 2, W // 2)
    return o.permute(0, 2, 3, 1).contiguous()


@torch.library.triton_op("fastmvit::patch_attention", mutates_args=())
def patch_attention(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    """Fused unfold + multi-head attention + fold; see ``fastmvit.kernels.attention.patch_attention``."""
    return _kernels.patch_attention(qkv, heads)


inference_only(patch_attention, "fastmvit::patch_attention")


class AttentionPlan:
    """``patch_attention`` resolved once for one qkv signature: ``plan(qkv, heads)`` launches without the op
    dispatch."""

    __slots__ = ("plan", "copy")

    def __init__(self, plan, copy: bool):
        self.plan, self.copy = plan, copy

    def __call__(self, qkv: torch.Tensor, heads: int) -> torch.Tensor:
        return self.plan(qkv.contiguous() if self.copy else qkv)


def patch_attention_plan(qkv: torch.Tensor, heads: int) -> AttentionPlan:
    """The checks and launch configuration of ``patch_attention`` for a qkv like this one, done once."""
    copy = qkv.dim() == 4 and qkv.stride(-1) != 1
    return AttentionPlan(_kernels.patch_attention_plan(qkv.contiguous() if copy else qkv, heads), copy)
