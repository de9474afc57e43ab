"""The MobileViT network (v1 and v2) with timm-compatible module names."""
from __future__ import annotations

from typing import List

import torch
from torch import nn

from ..engine import DEFAULT_MAX_BATCH, FUSED, TORCH, EngineCache, check_backend, choose_engine
from ..errors import InputError, OptionError
from ..variants import Variant, get_variant
from .blocks import InvertedResidual, MobileViTBlock, MobileViTv2Block
from .engine_owner import EngineOwner
from .layers import ConvNormAct, Numerics

__all__ = ["MobileViT", "MIN_INPUT_SIZE"]

# Five stride-2 stages take the input to 1/32 of its size; below 32 pixels a stage map would be empty
# of real content (the convolutions would run on padding alone).
MIN_INPUT_SIZE = 32


class MobileViT(EngineOwner):
    """MobileViT v1 or v2 classifier; ``forward`` takes float NCHW images and returns ``[B, num_classes]``
    logits (or pooled features when ``num_classes == 0``).

    ``backend`` chooses how ``forward`` runs (``fastmvit.engine.dispatch``): "auto" (the fused engine on
    CUDA tensors, the CPU engine on CPU tensors when a CPU runtime is installed), "triton" (the fused engine
    everywhere; on the CPU under the Triton interpreter, for tests), "onnxruntime" or "openvino" (the CPU
    engine on that runtime) or "torch" (the reference modules everywhere). ``forward_features`` and
    ``forward_stages`` always run the reference modules. ``cuda_graphs`` replays captured CUDA graphs on
    the engine path (every batch size whose graph fits the memory budget, or up to ``cuda_graph_max_batch``).
    """

    def __init__(self, variant: Variant | str, num_classes: int = 1000):
        super().__init__()
        variant = get_variant(variant)
        if not isinstance(num_classes, int) or num_classes < 0:
            raise OptionError(f"num_classes must be a non-negative int, got {num_classes!r}")
        self.variant = variant
        self.num_classes = num_classes
        self.stem = ConvNormAct(3, variant.stem_channels, 3, stride=2)
        stages, in_ch = [], variant.stem_channels
        for spec in variant.stages:
            blocks = []
            for j in range(spec.num_ir):
                blocks.append(InvertedResidual(in_ch, spec.out_channels, spec.stride if j == 0 else 1, spec.expand))
                in_ch = spec.out_channels
            if spec.transformer is not None:
                block = MobileViTBlock if variant.family == "v1" else MobileViTv2Block
                blocks.append(block(in_ch, spec.transformer))
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.final_conv = (ConvNormAct(in_ch, variant.final_conv_channels, 1)
                           if variant.final_conv_channels else nn.Identity())
        self.head = nn.Module()
        self.head.fc = nn.Linear(variant.num_features, num_classes) if num_classes else nn.Identity()
        self.numerics = Numerics()
        # Filled in by fastmvit.load(): where the weights came from and how to preprocess images.
        self.pretrained_cfg: dict = {}
        self.backend = "auto"
        self.cuda_graph_max_batch = DEFAULT_MAX_BATCH
        self._engines = EngineCache()
        self.eval()

    # ---------------------------------------------------------------------------------------------
    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        check_backend(value)
        self._backend = value

    # ---------------------------------------------------------------------------------------------
    def set_numerics(self, numerics: Numerics) -> "MobileViT":
        """Compute like a given source implementation (see ``Numerics``). The engine, built with the old
        numerics (``v2_odd_size`` decides its plan), is rebuilt at the next forward."""
        for m in self.modules():
            if hasattr(m, "numerics"):
                m.numerics = numerics
        self._engines.clear()
        return self

    def check_input(self, x) -> None:
        """Raise a clear error for anything the network cannot take.

        Values are not checked: NaN or infinite pixels give NaN logits, as in PyTorch, timm and HF. A check
        would read the whole input and, on a GPU, wait for it on every call (no CUDA-graph replay without a
        host sync); a caller that cannot trust its input checks ``torch.isfinite(x).all()``. The servers do:
        a non-finite tensor is refused with a 422 (``fastmvit.serving.common.ImageDecoder.check_images``)."""
        if not isinstance(x, torch.Tensor):
            raise InputError(f"expected a torch.Tensor of images [B, 3, H, W], got {type(x).__name__}")
        if x.dim() != 4:
            raise InputError(f"expected images of shape [B, 3, H, W] (4 dims), got shape {list(x.shape)}"
                             + ("; add a batch dimension with x.unsqueeze(0)" if x.dim() == 3 else ""))
        if x.shape[1] != 3:
            raise InputError(f"expected 3 colour channels in dim 1 (NCHW), got shape {list(x.shape)}"
                             + ("; the input looks channels-last, use x.permute(0, 3, 1, 2)"
                                if x.shape[-1] == 3 else ""))
        if not x.is_floating_point():
            raise InputError(f"expected a floating-point image tensor (float32/float16/bfloat16) scaled to "
                             f"[0, 1], got {x.dtype}; convert with x.float() / 255")
        if x.shape[0] == 0:
            raise InputError("got an empty batch (B == 0)")
        if min(x.shape[-2:]) < MIN_INPUT_SIZE:
            raise InputError(f"image of {x.shape[-2]}x{x.shape[-1]} is too small: MobileViT downsamples by 32, "
                             f"so height and width must be at least {MIN_INPUT_SIZE}")
        p = self.stem.conv.weight
        if x.device != p.device:
            raise InputError(f"input is on {x.device} but the model is on {p.device}; "
                             f"move one of them, e.g. x.to('{p.device}')")
        if x.dtype != p.dtype:
            raise InputError(f"input dtype {x.dtype} does not match the model's {p.dtype}; "
                             f"use x.to({p.dtype}) or model.to({x.dtype})")

    def check_engine_input(self, x, model: nn.Module) -> None:
        """``check_input``, and what the engines (BatchNorm folded, no gradients) refuse of ``model`` (this
        network, or a model built on it)."""
        self.check_input(x)
        if model.training:
            raise RuntimeError("fastmvit's engines run BatchNorm in eval mode (folded into the weights): "
                               "call model.eval(), or use backend='torch' for training-mode BatchNorm")
        if torch.is_grad_enabled() and (x.requires_grad or self.stem.conv.weight.requires_grad):
            raise RuntimeError("fastmvit's engines are inference-only: run the model under torch.no_grad() "
                               "or torch.inference_mode(), or use backend='torch' to compute gradients")

    # ---------------------------------------------------------------------------------------------
    def forward_stages(self, x: torch.Tensor) -> List[torch.Tensor]:
        """The five stage outputs at strides 2, 4, 8, 16 and 32 (timm ``features_only``, mmpretrain
        ``extract_feat`` with all ``out_indices``, HF ``hidden_states``)."""
        self.check_input(x)
        feats = []
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map before pooling (after the 1x1 expansion for v1), as timm's."""
        return self.final_conv(self.forward_stages(x)[-1])

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head.fc(features.mean(dim=(-2, -1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        engine = choose_engine(self.backend, x if isinstance(x, torch.Tensor) else torch.empty(0))
        if engine == TORCH:
            return self.forward_head(self.forward_features(x))
        self.check_engine_input(x, self)
        if engine != FUSED:
            return self._engines.cpu(engine).run(self, x)
        if torch.compiler.is_compiling():  # torch.compile traces the kernels; its own cudagraphs replace ours
            if not x.is_cuda:
                raise RuntimeError("torch.compile over fastmvit's fused engine needs CUDA tensors (on the CPU the "
                                   "kernels are interpreted and cannot be traced); compile with backend='torch'")
            return self._engines.engine(self, x)(x)
        return self._engines.runner(self, x)(x)

    @property
    def cpu_engine_runtimes(self) -> dict:
        """{(height, width, dtype, threads): "onnxruntime" or "openvino"}: the runtime the CPU engine runs per
        signature built so far (under backend="auto", the one measured faster here; see fastmvit.cpu.pick)."""
        return self._engines.cpu_runtimes()

    def extra_repr(self) -> str:
        cpu = "".join(f", cpu_engine[{h}x{w} {str(dtype).replace('torch.', '')} {t} thread{'s' * (t > 1)}]={r!r}"
                      for (h, w, dtype, t), r in self.cpu_engine_runtimes.items())
        return f"variant={self.variant.name!r}, num_classes={self.num_classes}, backend={self.backend!r}{cpu}"
