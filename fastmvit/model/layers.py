"""Small building blocks shared by every MobileViT block, and the numerics switches that make one module
tree reproduce each source implementation exactly (design notes, mobilevit.md section 7)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import OptionError

__all__ = ["Numerics", "NUMERICS_PRESETS", "resolve_numerics", "Activation", "ConvNormAct"]


@dataclass(frozen=True)
class Numerics:
    """How the reference (torch) path computes the few things the four implementations do differently.

    attention:   "prescale"  softmax((q * hd^-0.5) @ k^T) @ v   (ml-cvnets; timm with fused attention off)
                 "postscale" softmax((q @ k^T) / sqrt(hd)) @ v  (Hugging Face)
                 "sdpa"      F.scaled_dot_product_attention     (timm's default, mmpretrain)
    activation:  "silu" F.silu (ml-cvnets, timm, HF) or "x_sigmoid_x" x * sigmoid(x) (mmcv Swish)
    v2_odd_size: "resize" enlarge an odd-sized v2 block input to even with align_corners=True and keep it
                 (ml-cvnets, timm); "hf" unfold drops the last row/column and fold writes zeros there
                 (Hugging Face MobileViTV2)
    v2_local_dilation: segmentation backbones (output stride 8/16) only: the v2 block's depthwise 3x3 is
                 dilated like its stage ("stage": ml-cvnets, timm) or never ("none": Hugging Face)
    The differences are ~1e-7 (attention, activation) except v2_odd_size, which changes v2 logits at
    input sizes whose stage maps are odd (224 for example).
    """

    attention: str = "prescale"
    activation: str = "silu"
    v2_odd_size: str = "resize"
    v2_local_dilation: str = "stage"

    def __post_init__(self):
        for field, allowed in (("attention", ("prescale", "postscale", "sdpa")),
                               ("activation", ("silu", "x_sigmoid_x")),
                               ("v2_odd_size", ("resize", "hf")),
                               ("v2_local_dilation", ("stage", "none"))):
            if getattr(self, field) not in allowed:
                raise OptionError(f"Numerics.{field} must be one of {allowed}, got {getattr(self, field)!r}")


NUMERICS_PRESETS = {
    "cvnets": Numerics(),
    "timm": Numerics(),  # bit-exact with timm when TIMM_FUSED_ATTN=0, ~1e-7 from its fused default
    "hf": Numerics(attention="postscale", v2_odd_size="hf", v2_local_dilation="none"),
    "mmpretrain": Numerics(attention="sdpa", activation="x_sigmoid_x"),
}


def resolve_numerics(numerics, source_format: str | None = None) -> Numerics:
    """``numerics`` is a Numerics, a preset name, or "auto" (follow the checkpoint's source format)."""
    if isinstance(numerics, Numerics):
        return numerics
    if numerics == "auto":
        return NUMERICS_PRESETS.get(source_format or "cvnets", NUMERICS_PRESETS["cvnets"])
    if numerics in NUMERICS_PRESETS:
        return NUMERICS_PRESETS[numerics]
    raise OptionError(f"numerics must be 'auto', one of {sorted(NUMERICS_PRESETS)} or a Numerics, got {numerics!r}")


class Activation(nn.Module):
    """SiLU, computed the way the checkpoint's source computes it."""

    def __init__(self):
        super().__init__()
        self.numerics = Numerics()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.numerics.activation == "silu":
            return F.silu(x)
        return x * torch.sigmoid(x)


class ConvNormAct(nn.Module):
    """Conv2d (no bias) -> BatchNorm2d -> optional SiLU; padding keeps 'same' size at stride 1."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 1, stride: int = 1, groups: int = 1,
                 act: bool = True, dilation: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size, stride, padding=(kernel_size - 1) // 2 * dilation,
                              dilation=dilation, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_ch, eps=1e-5)
        self.act = Activation() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))
