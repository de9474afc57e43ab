"""``fastmvit.load()``: a MobileViT with the weights of any of its public checkpoint formats."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

import torch

from .errors import OptionError
from .model import MobileViT, Numerics, resolve_numerics
from .preprocess import PreprocessConfig, preprocess_config_for
from .variants import VARIANTS, get_variant
from .weights import read_checkpoint, resolve_pretrained, to_canonical
from .weights.reader import hf_config_labels

__all__ = ["load", "list_models", "parse_device"]


def parse_device(name: Union[str, torch.device, None]) -> torch.device:
    """A device from a user's option: None or "auto" is the first GPU when there is one, else the CPU.
    An unknown name, or CUDA where there is none, raises OptionError saying what is accepted."""
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise OptionError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise OptionError(f"device {name!r}: CUDA is not available here (torch {torch.__version__}); use cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise OptionError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def list_models() -> list:
    """Short names of every variant: "xxs", "xs", "s", "v2-0.5" ... "v2-2.0"."""
    return list(VARIANTS)


def load(
    name: str,
    weights=None,
    *,
    pretrained: Union[bool, str] = True,
    num_classes: Optional[int] = 1000,
    numerics: Union[str, Numerics] = "auto",
    backend: str = "auto",
    cuda_graphs: bool = True,
    device: Union[str, torch.device, None] = None,
    dtype: Optional[torch.dtype] = None,
    **segmentation_options,
) -> MobileViT:
    """Build a MobileViT and load its weights.

    Args:
        name: "xxs", "xs", "s", "v2-0.5" ... "v2-2.0", a timm name ("mobilevit_s", "mobilevitv2_100",
            optionally with a tag such as ".cvnets_in1k") or an Apple Hugging Face repo id.
        weights: a checkpoint file (timm .safetensors/.pth/.bin, ml-cvnets .pt, mmpretrain .pth), a Hugging
            Face ``save_pretrained`` directory, or a state dict in any of those layouts. The layout and
            variant are detected from the keys and shapes.
        pretrained: with ``weights=None``: True for the standard checkpoint, a tag ("cvnets_in1k",
            "cvnets_in22k_ft_in1k_384", "apple", see ``fastmvit.weights.pretrained_tags``), or False for
            random weights. Looked up in the fastmvit cache and the Hugging Face hub cache before
            downloading.
        num_classes: classes of the head; None takes the checkpoint's, 0 returns pooled features.
        numerics: "auto" computes exactly like the implementation the checkpoint came from; or one of
            "cvnets", "timm", "hf", "mmpretrain", or a ``Numerics``.
        backend: "auto" runs the fused Triton engine on CUDA tensors and the CPU engine (``fastmvit.cpu``:
            OpenVINO, else ONNX Runtime, else the plain modules) on CPU tensors; "triton" forces the fused
            engine (on CPU tensors under TRITON_INTERPRET=1, slow, for tests); "onnxruntime" or
            "openvino" force the CPU engine on that runtime; "torch" runs the plain PyTorch modules.
        cuda_graphs: replay CUDA graphs on the engine path, for every batch size whose graphs fit the
            memory budget (``model.cuda_graph_max_batch`` can also cap the batch).
        device, dtype: where and in which float type to put the model.

    Segmentation (MobileViT + DeepLabV3): name "deeplabv3-<variant>" or one of Apple's hub repositories
    ("apple/deeplabv3-mobilevit-small", ...), or any name with a segmentation checkpoint as ``weights``,
    returns a ``fastmvit.model.DeepLabV3``; ``output_stride=`` and ``atrous_rates=`` override what the
    checkpoint's config says (see ``fastmvit.segmentation.load_segmentation``).

    Returns the model in eval mode. ``model.pretrained_cfg`` records the source, the preprocessing the
    weights expect and the class labels.
    """
    from . import segmentation

    seg_options = dict(pretrained=pretrained, num_classes=num_classes, numerics=numerics, backend=backend,
                       cuda_graphs=cuda_graphs, device=device, dtype=dtype, **segmentation_options)
    if segmentation.is_segmentation_name(name):
        return segmentation.load_segmentation(name, weights, **seg_options)
    variant = get_variant(name)

    def refuse_segmentation_options():  # a classifier after all
        if segmentation_options:
            raise OptionError(f"{', '.join(segmentation_options)} apply to segmentation models only (names "
                            f"{segmentation.PREFIX}<variant>, Apple's DeepLabV3 repositories or segmentation "
                            f"weights)")

    if weights is None:
        refuse_segmentation_options()
    pretrained_weights = None
    if weights is None and pretrained:
        weights, pretrained_weights = resolve_pretrained(variant, pretrained)

    fmt, info, labels = None, {}, None
    if weights is not None:
        tensors, info = read_checkpoint(weights)
        if segmentation.is_segmentation_checkpoint(tensors):  # a DeepLabV3 checkpoint named by its backbone
            return segmentation.load_segmentation(name, _read=(tensors, info), **seg_options)
        refuse_segmentation_options()
        canonical = to_canonical(tensors, variant.name, num_classes)
        fmt, num_classes = canonical.fmt, canonical.num_classes
        model = MobileViT(variant, num_classes)
        model.load_state_dict(canonical.state_dict, strict=True)
        labels = hf_config_labels(info)
    else:
        model = MobileViT(variant, 1000 if num_classes is None else num_classes)

    model.set_numerics(resolve_numerics(numerics, fmt))
    model.backend = backend
    model.cuda_graphs = cuda_graphs
    model.requires_grad_(False)  # an inference engine; call requires_grad_() to train the torch path
    preprocess = preprocess_config_for(fmt or "timm", variant.family, pretrained_weights)
    hf_processor = Path(info["path"]).parent / "preprocessor_config.json" if info.get("path") else None
    if hf_processor is not None and hf_processor.is_file():
        try:
            preprocess = PreprocessConfig.from_hf_processor(json.loads(hf_processor.read_text()))
        except (ValueError, TypeError, AttributeError):
            pass  # an unreadable processor config: keep the layout's default
    if labels is None and model.num_classes == 1000:
        labels = "imagenet-1k"
    model.pretrained_cfg = {
        "variant": variant.name,
        "source_format": fmt,
        "file": info.get("path"),
        "tag": pretrained_weights.tag if pretrained_weights else None,
        "numerics": model.numerics,
        "preprocess": preprocess,
        "labels": labels,
    }
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    return model
