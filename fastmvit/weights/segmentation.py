"""Segmentation checkpoints (MobileViT + DeepLabV3) in Hugging Face's and ml-cvnets' layouts: detection,
key maps onto ``fastmvit.model.DeepLabV3`` and the published repositories.

The backbone keys are the classifier's (``layouts.key_table``) under the layout's prefix, without the v1
expansion conv and the classifier; the head keys are listed here (design notes, mobilevit.md 8.3).
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from ..errors import CheckpointError
from ..variants import VARIANTS, Variant
from .layouts import key_table

__all__ = ["SEGMENTATION_FORMATS", "HUB_REPOS", "is_segmentation_checkpoint", "detect_segmentation_format",
           "segmentation_key_table", "segmentation_to_canonical", "segmentation_from_canonical",
           "SegmentationWeights"]

SEGMENTATION_FORMATS = ("hf", "cvnets", "fastmvit")  # fastmvit: DeepLabV3.state_dict() itself

# Apple's published DeepLabV3 checkpoints on the Hugging Face hub (PASCAL VOC, 21 classes, output stride 16).
HUB_REPOS = {
    "apple/deeplabv3-mobilevit-xx-small": "xxs",
    "apple/deeplabv3-mobilevit-x-small": "xs",
    "apple/deeplabv3-mobilevit-small": "s",
    "apple/mobilevitv2-1.0-voc-deeplabv3": "v2-1.0",
    "apple/mobilevitv2-1.5-voc-deeplabv3": "v2-1.5",
}

_MARKERS = (
    ("hf", "segmentation_head.classifier.convolution.weight"),
    ("cvnets", "seg_head.classifier.block.conv.weight"),
    ("fastmvit", "head.classifier.weight"),
)
# ml-cvnets' auxiliary head on stage 4 only trains; it never changes the logits.
_IGNORED = re.compile(r"seg_head\.aux_head\.")


def detect_segmentation_format(keys) -> Optional[str]:
    keys = set(keys)
    return next((fmt for fmt, marker in _MARKERS if marker in keys), None)


def is_segmentation_checkpoint(keys) -> bool:
    return detect_segmentation_format(keys) is not None


def _head_key(key: str, fmt: str) -> str:
    """A canonical head key (``head.…``) in a layout."""
    if fmt == "fastmvit":
        return key
    hf = fmt == "hf"
    sub = (lambda s: {"conv": "convolution", "bn": "normalization"}[s]) if hf else \
        (lambda s: {"conv": "block.conv", "bn": "block.norm"}[s])
    aspp = "segmentation_head.aspp" if hf else "seg_head.aspp.aspp_layer"
    m = re.fullmatch(r"head\.aspp\.convs\.(\d)\.(conv|bn)\.(\w+)", key)
    if m:
        return f"{aspp}.convs.{m[1]}.{sub(m[2])}.{m[3]}"
    m = re.fullmatch(r"head\.aspp\.pool\.(conv|bn)\.(\w+)", key)
    if m:
        pool = "convs.4.conv_1x1" if hf else "convs.4.aspp_pool.conv_1x1"
        return f"{aspp}.{pool}.{sub(m[1])}.{m[2]}"
    m = re.fullmatch(r"head\.aspp\.project\.(conv|bn)\.(\w+)", key)
    if m:
        return f"{aspp}.project.{sub(m[1])}.{m[2]}"
    m = re.fullmatch(r"head\.classifier\.(weight|bias)", key)
    if m:
        return f"segmentation_head.classifier.convolution.{m[1]}" if hf else f"seg_head.classifier.block.conv.{m[1]}"
    raise KeyError(key)


@functools.lru_cache(maxsize=None)
def segmentation_shapes(variant: str, num_classes: int, aspp_channels: int) -> Dict[str, Tuple[int, ...]]:
    """Every tensor of a DeepLabV3's state dict and its shape (meta device, no memory)."""
    from ..model.segmentation import DeepLabV3, SegmentationConfig

    with torch.device("meta"):
        model = DeepLabV3(variant, SegmentationConfig(num_classes, aspp_channels=aspp_channels))
    return {k: tuple(t.shape) for k, t in model.state_dict().items()}


@functools.lru_cache(maxsize=None)
def segmentation_key_table(variant: str, fmt: str, num_classes: int = 21,
                           aspp_channels: int = 256) -> Tuple[Tuple[str, Tuple[str, ...]], ...]:
    """(canonical key, its key(s) in ``fmt``) for every tensor of a DeepLabV3."""
    if fmt not in SEGMENTATION_FORMATS:
        raise ValueError(f"unknown segmentation checkpoint layout {fmt!r}; known: {SEGMENTATION_FORMATS}")
    backbone = key_table(variant, "timm" if fmt == "fastmvit" else fmt).to_canonical()
    prefix = {"cvnets": "encoder.", "fastmvit": "backbone."}.get(fmt, "")
    entries = []
    for key in segmentation_shapes(variant, num_classes, aspp_channels):
        if key.startswith("backbone."):
            entries.append((key, tuple(prefix + k for k in backbone[key[len("backbone."):]])))
        else:
            entries.append((key, (_head_key(key, fmt),)))
    return tuple(entries)


@dataclass
class SegmentationWeights:
    fmt: str
    variant: Variant
    num_classes: int
    aspp_channels: int
    state_dict: Dict[str, torch.Tensor]


def _family(fmt: str, keys) -> str:
    if fmt == "fastmvit":
        return "v1" if any(".conv_fusion." in k for k in keys) else "v2"
    if fmt == "hf":
        return "v1" if "mobilevit.conv_stem.convolution.weight" in keys else "v2"
    return "v1" if any(".fusion." in k for k in keys) else "v2"


def _mismatches(tensors, table, shapes) -> Tuple[List[str], List[str], List[str]]:
    missing, mismatched, expected = [], [], set()
    for canon, srcs in table:
        want = list(shapes[canon])
        if want and len(srcs) > 1:
            want[0] //= len(srcs)  # HF's separate query/key/value share the packed qkv's dim 0
        for src in srcs:
            expected.add(src)
            if src not in tensors:
                if not src.endswith("num_batches_tracked"):
                    missing.append(src)
            elif list(tensors[src].shape) != want:
                mismatched.append(f"{src} (checkpoint {list(tensors[src].shape)}, expected {want})")
    unexpected = [k for k in tensors if k not in expected and not _IGNORED.match(k)]
    return missing, unexpected, mismatched


def _describe(missing, unexpected, mismatched, show: int = 5) -> str:
    parts = []
    for what, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
        if keys:
            more = f" (+{len(keys) - show} more)" if len(keys) > show else ""
            parts.append(f"{what}: {', '.join(keys[:show])}{more}")
    return "; ".join(parts)


def segmentation_to_canonical(tensors: Dict[str, torch.Tensor],
                              variant: Optional[Variant] = None) -> SegmentationWeights:
    """Rename a segmentation checkpoint's tensors to ``DeepLabV3``'s keys; the variant, the number of classes
    and the ASPP width are read from the shapes. Raises CheckpointError naming the offending keys."""
    fmt = detect_segmentation_format(tensors)
    if fmt is None:
        raise CheckpointError("not a MobileViT segmentation checkpoint: none of "
                              f"{', '.join(m for _, m in _MARKERS)} is present")
    fmt_name = {"hf": "Hugging Face", "cvnets": "ml-cvnets", "fastmvit": "fastmvit"}[fmt]
    family = _family(fmt, tensors)
    if variant is not None and variant.family != family:
        raise CheckpointError(f"checkpoint is a MobileViT{'v2' if family == 'v2' else ''} DeepLabV3 in {fmt_name} "
                              f"layout, but {variant.name!r} ({variant.timm_name}) was requested")
    num_classes = int(tensors[_head_key("head.classifier.weight", fmt)].shape[0])
    aspp_key = _head_key("head.aspp.project.conv.weight", fmt)
    aspp_channels = int(tensors[aspp_key].shape[0]) if aspp_key in tensors else 0
    best = None
    for v in (v for v in VARIANTS.values() if v.family == family):
        table = segmentation_key_table(v.name, fmt, num_classes, max(aspp_channels, 1))
        problems = _mismatches(tensors, table, segmentation_shapes(v.name, num_classes, max(aspp_channels, 1)))
        score = sum(map(len, problems))
        if score == 0:
            if variant is not None and v is not variant:
                raise CheckpointError(f"checkpoint is DeepLabV3 on {v.name!r} ({v.timm_name}) in {fmt_name} layout, "
                                      f"but {variant.name!r} was requested; load it as "
                                      f"fastmvit.load('deeplabv3-{v.name}', weights=...)")
            state = {}
            for canon, srcs in table:
                if any(s not in tensors for s in srcs):  # only num_batches_tracked may be absent
                    state[canon] = torch.zeros((), dtype=torch.long)
                    continue
                parts = [tensors[s] for s in srcs]
                state[canon] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
            return SegmentationWeights(fmt, v, num_classes, aspp_channels, state)
        if variant is v or (variant is None and (best is None or score < best[0])):
            best = (score, v, problems)
    _, v, problems = best
    raise CheckpointError(f"segmentation checkpoint in {fmt_name} layout does not fit DeepLabV3 on {v.name!r} "
                          f"({v.timm_name}): {_describe(*problems)}")


def segmentation_from_canonical(state_dict: Dict[str, torch.Tensor], variant: str,
                                fmt: str) -> Dict[str, torch.Tensor]:
    """Write a DeepLabV3 state dict in Hugging Face's or ml-cvnets' layout."""
    classes = state_dict["head.classifier.weight"].shape[0]
    channels = state_dict["head.aspp.project.conv.weight"].shape[0]
    out = {}
    for canon, srcs in segmentation_key_table(variant, fmt, classes, channels):
        t = state_dict[canon]
        for src, part in zip(srcs, t.chunk(len(srcs), dim=0) if len(srcs) > 1 else (t,)):
            out[src] = part.clone()
    return out
