"""``fastmvit.load()`` for MobileViT + DeepLabV3 segmentation models: names, published checkpoints,
preprocessing and class names. ``load`` hands over here for a segmentation name or checkpoint."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from .errors import CheckpointError, OptionError, WeightsNotFoundError
from .masks import VOC_CLASSES
from .model.layers import resolve_numerics
from .model.segmentation import DeepLabV3, SegmentationConfig
from .preprocess import PreprocessConfig
from .variants import VARIANTS, Variant, get_variant
from .weights.reader import hf_config_labels, read_checkpoint
from .weights.segmentation import HUB_REPOS, is_segmentation_checkpoint, segmentation_to_canonical

__all__ = ["is_segmentation_name", "segmentation_variant", "load_segmentation", "segmentation_models"]

PREFIX = "deeplabv3-"
_HUB_BY_VARIANT = {v: repo for repo, v in HUB_REPOS.items()}

# Apple's hub preprocessor_config.json for the DeepLabV3 checkpoints: shorter side 544, centre crop 512,
# bilinear, RGB flipped to BGR.
HF_SEGMENTATION_PREPROCESS = PreprocessConfig(512, 544, "bilinear", "BGR", "floor")


def segmentation_models() -> list:
    """Names ``load`` accepts for segmentation: "deeplabv3-<variant>" and Apple's hub repositories."""
    return [PREFIX + v for v in VARIANTS] + list(HUB_REPOS)


def is_segmentation_name(name) -> bool:
    return isinstance(name, str) and (name.strip().lower().startswith(PREFIX) or name.strip().lower() in HUB_REPOS)


def segmentation_variant(name: str) -> Variant:
    """The backbone of a segmentation name: "deeplabv3-s", "deeplabv3-mobilevit_s", "deeplabv3-v2-1.0",
    or a hub id such as "apple/deeplabv3-mobilevit-small"."""
    key = name.strip().lower()
    if key in HUB_REPOS:
        return VARIANTS[HUB_REPOS[key]]
    try:
        return get_variant(key[len(PREFIX):])
    except ValueError:
        raise OptionError(f"unknown segmentation model {name!r}; valid names: {', '.join(segmentation_models())}") \
            from None


def _resolve_hub(repo_id: str) -> str:
    """A local directory holding the hub repository's config and weights (cache first, then download)."""
    import huggingface_hub

    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    patterns = ["config.json", "preprocessor_config.json", "model.safetensors", "pytorch_model.bin"]
    try:
        path = huggingface_hub.snapshot_download(repo_id, allow_patterns=patterns, local_files_only=offline)
    except Exception as e:  # network, auth, not cached: all mean "not available here"
        why = "HF_HUB_OFFLINE is set and it is not cached" if offline else f"{type(e).__name__}: {e}"
        raise WeightsNotFoundError(
            f"pretrained segmentation weights {repo_id} are not available: {why}. To continue:\n"
            f"  - download https://huggingface.co/{repo_id} (config.json, preprocessor_config.json and the "
            f"weights) on a machine with network and pass the folder: fastmvit.load({repo_id!r}, weights=DIR);\n"
            f"  - or ask for random weights: fastmvit.load({repo_id!r}, pretrained=False).") from e
    if not any((Path(path) / f).is_file() for f in patterns[2:]):
        raise WeightsNotFoundError(f"{repo_id} in {path} has no model.safetensors or pytorch_model.bin")
    return path


def _cvnets_defaults(variant: Variant, num_classes: int):
    """(output stride, atrous rates) of ml-cvnets' DeepLabV3 yamls, which its checkpoints do not record:
    v1 PASCAL VOC 8 and 12/24/36; v2 PASCAL VOC 16 and 6/12/18; v2 ADE20K (150 classes) 8 and 12/24/36."""
    if variant.family == "v1" or num_classes == 150:
        return 8, (12, 24, 36)
    return 16, (6, 12, 18)


def _config_from(hf_config: dict, fmt: str, variant: Variant, num_classes: int, aspp_channels: int,
                 output_stride, atrous_rates) -> SegmentationConfig:
    """Head shape: the arguments first, then the checkpoint's config.json, then the defaults of where the
    layout's published checkpoints come from (Apple's hub configs, ml-cvnets' yamls)."""
    default_stride, default_rates = (_cvnets_defaults(variant, num_classes) if fmt == "cvnets"
                                     else (16, (6, 12, 18)))
    if output_stride is None:
        output_stride = int(hf_config.get("output_stride", default_stride))
    if atrous_rates is None:
        atrous_rates = tuple(int(r) for r in hf_config.get("atrous_rates", default_rates))
    return SegmentationConfig(num_classes, output_stride, tuple(atrous_rates), aspp_channels)


def load_segmentation(
    name: Optional[str],
    weights=None,
    *,
    pretrained: Union[bool, str] = True,
    num_classes: Optional[int] = None,
    output_stride: Optional[int] = None,
    atrous_rates: Optional[Sequence[int]] = None,
    numerics="auto",
    backend: str = "auto",
    cuda_graphs: bool = True,
    device=None,
    dtype=None,
    _read=None,
) -> DeepLabV3:
    """Build a DeepLabV3 and load its weights; see ``fastmvit.load``.

    ``weights``: a Hugging Face ``save_pretrained`` directory or weight file of
    ``MobileViT[V2]ForSemanticSegmentation``, an ml-cvnets DeepLabV3 ``.pt``, or a state dict in either
    layout. The variant, number of classes and ASPP width come from the tensors; the output stride and
    atrous rates from the arguments, else ``config.json``, else the published defaults (Hugging Face: 16 and
    6/12/18; an ml-cvnets checkpoint records neither, so its yamls' values: see ``_cvnets_defaults``).
    ``num_classes``: None (or ``load``'s classification default, 1000) takes the checkpoint's, 21 (PASCAL
    VOC) for random weights.
    """
    variant = segmentation_variant(name) if name is not None and is_segmentation_name(name) else \
        (get_variant(name) if name is not None else None)
    source = None
    if weights is None and _read is None and pretrained:
        if variant is None or variant.name not in _HUB_BY_VARIANT:
            have = ", ".join(f"deeplabv3-{v} ({r})" for r, v in HUB_REPOS.items())
            raise WeightsNotFoundError(
                f"no published DeepLabV3 checkpoint for {variant.name if variant else name!r}; published: {have}. "
                f"Pass weights=PATH, or pretrained=False for random weights")
        source = _HUB_BY_VARIANT[variant.name]
        weights = _resolve_hub(source)

    if weights is None and _read is None:  # random weights: Apple's head shape
        config = SegmentationConfig(21 if num_classes in (None, 1000) else num_classes,
                                    output_stride or 16, tuple(atrous_rates or (6, 12, 18)))
        model, fmt, info, hf_config = DeepLabV3(variant, config), None, {}, {}
    else:
        tensors, info = _read if _read is not None else read_checkpoint(weights)
        if not is_segmentation_checkpoint(tensors):
            raise CheckpointError("expected a MobileViT DeepLabV3 segmentation checkpoint (Hugging Face "
                                  "MobileViT[V2]ForSemanticSegmentation or ml-cvnets deeplabv3), but the weights "
                                  "have no segmentation head; load a classifier with its variant name instead")
        canonical = segmentation_to_canonical(tensors, variant)
        if num_classes not in (None, 1000, canonical.num_classes):
            raise CheckpointError(f"checkpoint has a {canonical.num_classes}-class segmentation head but "
                                  f"num_classes={num_classes} was requested; pass num_classes=None")
        fmt, variant, hf_config = canonical.fmt, canonical.variant, info.get("hf_config") or {}
        config = _config_from(hf_config, fmt, variant, canonical.num_classes, canonical.aspp_channels,
                              output_stride, atrous_rates)
        model = DeepLabV3(variant, config)
        model.load_state_dict(canonical.state_dict, strict=True)

    model.set_numerics(resolve_numerics(numerics, fmt or "hf"))
    model.backend = backend
    model.cuda_graphs = cuda_graphs
    model.requires_grad_(False)
    preprocess = _preprocess_for(fmt, variant, info)
    labels = hf_config_labels(info)
    if labels is None and model.num_classes == len(VOC_CLASSES):
        labels = list(VOC_CLASSES)
    model.pretrained_cfg = {
        "variant": variant.name,
        "task": "segmentation",
        "source_format": fmt,
        "file": info.get("path"),
        "repo": source,
        "numerics": model.numerics,
        "preprocess": preprocess,
        "labels": labels,
        "output_stride": model.output_stride,
        # ml-cvnets' head upsamples its logits with align_corners=True, Hugging Face's post-processing with False
        "upsample_align_corners": fmt == "cvnets",
    }
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    return model


def _preprocess_for(fmt, variant: Variant, info: dict) -> PreprocessConfig:
    processor = Path(info["path"]).parent / "preprocessor_config.json" if info.get("path") else None
    if processor is not None and processor.is_file():
        try:
            return PreprocessConfig.from_hf_processor(json.loads(processor.read_text()))
        except (ValueError, TypeError, AttributeError):
            pass  # an unreadable processor config: keep the layout's default
    if fmt == "cvnets":  # v1 weights trained on BGR (cv2), v2 on RGB (PIL); see mobilevit.md 9.2
        return PreprocessConfig(512, 544, "bilinear", "BGR" if variant.family == "v1" else "RGB")
    return HF_SEGMENTATION_PREPROCESS
