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

The fused engine (``fastmvit.engine.plan``: ``build_steps`` reads this module tree) runs the same network
on CUDA tensors, or with ``backend="triton"``: dilated depthwise and dense 3x3 kernels, the ASPP projection
reading its four map branches without their concatenation and the image-pooling branch as a per-image
bias; ``labels`` fuses the final bilinear upsampling with the argmax.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..engine import BACKENDS, DEFAULT_MAX_BATCH, FUSED, EngineCache, choose_engine
from ..engine.dispatch import CPU_RUNTIMES
from ..errors import OptionError
from ..variants import Variant, get_variant
from .blocks import MobileViTv2Block
from .engine_owner import EngineOwner
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


class DeepLabV3(EngineOwner):
    """MobileViT (v1 or v2) + DeepLabV3. ``forward(images)`` takes float NCHW images in [0, 1] (channel order
    per ``pretrained_cfg["preprocess"]``) and returns logits ``[B, num_classes, h, w]`` at 1/output_stride of
    the input, as Hugging Face does; ``forward(images, upsample=True)`` resizes them to the input size.
    ``labels(images)`` returns class indices ``[B, H, W]`` at the input size.

    ``backend`` as for ``MobileViT``: the fused engine on CUDA tensors ("auto") or wherever asked
    ("triton"; interpreted on the CPU), the plain PyTorch modules otherwise. The engine's logits are a
    channels-last view (NCHW shape, channels-contiguous strides). The CPU engine exports classifiers only:
    backend="onnxruntime"/"openvino" run the PyTorch modules (``engine_note`` says so, once).
    """

    task = "segmentation"
    engine_note = ("segmentation models run the plain PyTorch modules on the CPU runtimes: the CPU engine "
                   "exports classifiers only")

    def __init__(self, variant: Variant | str, config: SegmentationConfig = SegmentationConfig()):
        super().__init__()
        self._engines = EngineCache()
        self._cuda_graph_max_batch = DEFAULT_MAX_BATCH
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

    @property
    def upsample_align_corners(self) -> bool:
        """How logits are resized to the image: ml-cvnets' head aligns corners, HF's post-processing not."""
        return bool(self.pretrained_cfg.get("upsample_align_corners", False))

    def set_numerics(self, numerics: Numerics) -> "DeepLabV3":
        self.backbone.set_numerics(numerics)
        self.numerics = numerics
        for block, dilation in self._v2_local:
            _set_conv(block.conv_kxk.conv, stride=1,
                      dilation=dilation if numerics.v2_local_dilation == "stage" else 1)
        self._engines.clear()
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

    def _engine(self, x) -> str:
        return choose_engine(self.backend, x if isinstance(x, torch.Tensor) else torch.empty(0))

    def _logits(self, x: torch.Tensor, engine: str) -> torch.Tensor:
        if engine != FUSED:
            if self.backend in CPU_RUNTIMES and not self._engine_noted:
                warnings.warn(self.engine_note, stacklevel=3)
                self._engine_noted = True
            return self.head(self.backbone.forward_stages(x)[-1])
        self.backbone.check_engine_input(x, self)
        if torch.compiler.is_compiling():
            if not x.is_cuda:
                raise RuntimeError("torch.compile over fastmvit's fused engine needs CUDA tensors (on the CPU the "
                                   "kernels are interpreted and cannot be traced); compile with backend='torch'")
            return self._engines.engine(self, x)(x)
        return self._engines.runner(self, x)(x)

    def forward(self, x: torch.Tensor, upsample: bool = False) -> torch.Tensor:
        logits = self._logits(x, self._engine(x))
        if upsample:
            logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return logits

    def labels(self, x: torch.Tensor, size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """Class indices ``[B, H, W]`` (int64; ties to the lowest class) of the logits bilinearly resized to
        ``size`` (default: the input's H, W) with ``upsample_align_corners``: ``fastmvit.masks.label_map``'s
        arithmetic. On the fused engine one kernel resizes and takes the argmax (the resized logits are
        never stored)."""
        engine = self._engine(x)
        logits = self._logits(x, engine)
        size = tuple(x.shape[-2:]) if size is None else tuple(size)
        if engine == FUSED:
            from ..ops.labels import bilinear_argmax  # the kernels load with the engine, never at import

            if len(size) != 2 or not all(isinstance(s, int) and s >= 1 for s in size):
                raise OptionError(f"size must be (height, width), two positive ints, got {size!r}")
            return bilinear_argmax(logits, size, self.upsample_align_corners)
        from ..masks import label_map

        return label_map(logits, size=size, align_corners=self.upsample_align_corners)

    def extra_repr(self) -> str:
        c = self.config
        return (f"variant={self.variant.name!r}, num_classes={c.num_classes}, output_stride={c.output_stride}, "
                f"atrous_rates={c.atrous_rates}")


def _set_conv(conv: nn.Conv2d, stride: int, dilation: int) -> None:
    k = conv.kernel_size[0]
    conv.stride = (stride, stride)
    conv.dilation = (dilation, dilation)
    conv.padding = ((k - 1) // 2 * dilation,) * 2
