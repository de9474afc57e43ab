"""DeepLabV3 semantic segmentation on a MobileViT / MobileViTv2 backbone: the plain-PyTorch reference.

As Hugging Face (``MobileViT[V2]ForSemanticSegmentation``) and ml-cvnets (``encoder_decoder`` +
``deeplabv3``) build it (design notes, mobilevit.md sections 7 D5 and 10):

* the classification backbone without its 1x1 expansion conv (v1) and classifier;
* output stride 16 or 8: stage 5 (and stage 4 for 8) keeps its resolution. The stage's downsampling
  inverted residual runs at stride 1 with the dilation the network had *before* the stage, and the
  stage's dilation doubles. In the MobileViT block the v1 local 3x3 conv is never dilated; the v2
  depthwise one is dilated by ml-cvnets and not by Hugging Face (``Numerics.v2_local_dilation``);
* ASPP on the stage-5 map: a 1x1 branch, three 3x3 branches dilated by ``atrous_rates``, an
  image-pooling branch (global mean -> 1x1 conv -> bilinear back to the map size), each conv-BN-ReLU;
  their concatenation projected by a 1x1 conv-BN-ReLU;
* a 1x1 classifier conv with bias. Logits come out at 1/output_stride of the input, as HF returns them.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..engine import BACKENDS
from ..errors import OptionError
from ..variants import Variant, get_variant
from .blocks import MobileViTv2Block
from .layers import ConvNormAct, Numerics
from .mobilevit import MobileViT

__all__ = ["DeepLabV3", "SegmentationConfig", "ASPP", "OUTPUT_STRIDES", "stage_dilations"]

OUTPUT_STRIDES = (8, 16, 32)


@dataclass(frozen=True)
class SegmentationConfig:
    """The DeepLabV3 head's shape. The defaults are those of Apple's published checkpoints: output stride 16,
    rates 6/12/18, ASPP width 256 for v1 and 512 for v2 (``aspp_channels=None`` picks by family)."""

    num_classes: int = 21
    output_stride: int = 16
    atrous_rates: Tuple[int, int, int] = (6, 12, 18)
    aspp_channels: Optional[int] = None

    def __post_init__(self):
        if not isinstance(self.num_classes, int) or self.num_classes < 1:
            raise OptionError(f"num_classes must be a positive int, got {self.num_classes!r}")
        if self.output_stride not in OUTPUT_STRIDES:
            raise OptionError(f"output_stride must be one of {OUTPUT_STRIDES}, got {self.output_stride!r}")
        rates = tuple(self.atrous_rates)
        if len(rates) != 3 or not all(isinstance(r, int) and r >= 1 for r in rates):
            raise OptionError(f"atrous_rates must be three positive ints, got {self.atrous_rates!r}")
        object.__setattr__(self, "atrous_rates", rates)
        if self.aspp_channels is not None and (not isinstance(self.aspp_channels, int) or self.aspp_channels < 1):
            raise OptionError(f"aspp_channels must be a positive int, got {self.aspp_channels!r}")

    def channels_for(self, variant: Variant) -> int:
        if self.aspp_channels is not None:
            return self.aspp_channels
        return 256 if variant.family == "v1" else 512


def stage_dilations(output_stride: int) -> Tuple[Tuple[int, int], ...]:
    """(stride of the stage's first block, dilation of the stage's 3x3 convs) for the five stages.

    The downsampling block of a dilated stage runs at stride 1 with the dilation reached *before* the
    stage (HF: ``dilation // 2``, ml-cvnets: ``prev_dilation``); the returned dilation is the stage's own.
    """
    dilated = {32: (), 16: (4,), 8: (3, 4)}[output_stride]
    out, dilation = [], 1
    for s, stride in enumerate((1, 2, 2, 2, 2)):
        if s in dilated:
            dilation *= 2
            stride = 1
        out.append((stride, dilation))
    return tuple(out)


class ConvNormReLU(ConvNormAct):
    """The DeepLabV3 head's conv-BN-ReLU (the backbone uses SiLU)."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 1, dilation: int = 1):
        super().__init__(in_ch, out_ch, kernel_size, dilation=dilation, act=False)
        self.act = nn.ReLU()


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: ``convs`` are the 1x1 and the three atrous 3x3 branches, ``pool`` the
    1x1 conv of the image-pooling branch, ``project`` the 1x1 conv over all five."""

    def __init__(self, in_ch: int, channels: int, rates: Sequence[int]):
        super().__init__()
        self.convs = nn.ModuleList([ConvNormReLU(in_ch, channels, 1)]
                                   + [ConvNormReLU(in_ch, channels, 3, dilation=r) for r in rates])
        self.pool = ConvNormReLU(in_ch, channels, 1)
        self.project = ConvNormReLU(5 * channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # adaptive_avg_pool2d and interpolate from 1x1, exactly as HF and ml-cvnets compute the branch
        pooled = F.interpolate(self.pool(F.adaptive_avg_pool2d(x, 1)), size=x.shape[-2:], mode="bilinear",
                               align_corners=False)
        return self.project(torch.cat([conv(x) for conv in self.convs] + [pooled], dim=1))


class DeepLabHead(nn.Module):
    def __init__(self, in_ch: int, channels: int, num_classes: int, rates: Sequence[int]):
        super().__init__()
        self.aspp = ASPP(in_ch, channels, rates)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.aspp(x))


class DeepLabV3(nn.Module):
    """MobileViT (v1 or v2) + DeepLabV3. ``forward(images)`` takes float NCHW images in [0, 1] (channel order
    per ``pretrained_cfg["preprocess"]``) and returns logits ``[B, num_classes, h, w]`` at 1/output_stride of
    the input, as Hugging Face does; ``forward(images, upsample=True)`` resizes them to the input size.
    ``fastmvit.masks.label_map`` turns logits into class indices.

    Runs the plain PyTorch modules on every device: the fused engine has no dilated kernels yet, so
    ``backend`` other than "torch" falls back to them (``engine_note`` says so).
    """

    task = "segmentation"
    engine_note = ("segmentation models run the plain PyTorch modules on every device: the fused engine has "
                   "no dilated convolution or ASPP kernels yet, and the CPU engine exports classifiers only")

    def __init__(self, variant: Variant | str, config: SegmentationConfig = SegmentationConfig()):
        super().__init__()
        variant = get_variant(variant)
        self.variant = variant
        self.config = config
        self.backbone = MobileViT(variant, num_classes=0)
        self.backbone.backend = "torch"  # its stages are dilated below: the engine's plan would not know
        self.backbone.final_conv = nn.Identity()  # segmentation reads stage 5 before the v1 expansion conv
        self._dilate(stage_dilations(config.output_stride))
        self.head = DeepLabHead(variant.stage_channels[-1], config.channels_for(variant), config.num_classes,
                                config.atrous_rates)
        self.numerics = Numerics()
        self.pretrained_cfg: dict = {}
        self.backend = "auto"
        self._engine_noted = False
        self.eval()

    def _dilate(self, plan) -> None:
        """Replace the stride of dilated stages by dilation (see ``stage_dilations``)."""
        before = 1
        self._v2_local = []  # (v2 block, its dilation when Numerics.v2_local_dilation == "stage")
        for stage, (stride, dilation) in zip(self.backbone.stages, plan):
            first = stage[0]
            if stride == 1 and first.conv2_kxk.conv.stride != (1, 1):
                _set_conv(first.conv2_kxk.conv, stride=1, dilation=before)
            for block in stage:
                if isinstance(block, MobileViTv2Block):
                    self._v2_local.append((block, dilation))
            before = dilation

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def output_stride(self) -> int:
        return self.config.output_stride

    def set_numerics(self, numerics: Numerics) -> "DeepLabV3":
        self.backbone.set_numerics(numerics)
        self.numerics = numerics
        for block, dilation in self._v2_local:
            _set_conv(block.conv_kxk.conv, stride=1,
                      dilation=dilation if numerics.v2_local_dilation == "stage" else 1)
        return self

    def check_input(self, x) -> None:
        self.backbone.check_input(x)

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        if value not in BACKENDS:
            raise OptionError(f"backend must be one of {BACKENDS}, got {value!r}")
        self._backend = value

    def forward(self, x: torch.Tensor, upsample: bool = False) -> torch.Tensor:
        if not self._engine_noted and isinstance(x, torch.Tensor) and (
                self.backend not in ("torch", "auto") or (self.backend == "auto" and x.is_cuda)):
            warnings.warn(self.engine_note, stacklevel=2)
            self._engine_noted = True
        logits = self.head(self.backbone.forward_stages(x)[-1])
        if upsample:
            logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return logits

    def extra_repr(self) -> str:
        c = self.config
        return (f"variant={self.variant.name!r}, num_classes={c.num_classes}, output_stride={c.output_stride}, "
                f"atrous_rates={c.atrous_rates}")


def _set_conv(conv: nn.Conv2d, stride: int, dilation: int) -> None:
    k = conv.kernel_size[0]
    conv.stride = (stride, stride)
    conv.dilation = (dilation, dilation)
    conv.padding = ((k - 1) // 2 * dilation,) * 2
