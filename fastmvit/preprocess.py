"""Image preprocessing as each checkpoint source evaluated it, and ImageNet-1k class names.

MobileViT takes pixels scaled to [0, 1] with no mean/std normalisation; sources differ in the resize,
the interpolation and the channel order (v1 weights from ml-cvnets, Hugging Face and mmpretrain expect
BGR; timm's and all v2 weights RGB). See ``../shared/design/mobilevit.md`` section 9.2.
"""
from __future__ import annotations

import functools
import io
import math
import os
import re
import warnings
from dataclasses import asdict, dataclass
from importlib import resources
from typing import List, Optional, Sequence

import numpy as np
import torch

from .errors import InputError, OptionError

__all__ = [
    "PreprocessConfig", "preprocess_config_for", "load_image", "preprocess", "imagenet_classes", "imagenet_wnids",
    "topk",
]


@dataclass(frozen=True)
class PreprocessConfig:
    """Resize the shorter side to ``resize``, centre-crop ``input_size``, scale to [0, 1], order channels."""

    input_size: int = 256
    resize: int = 288
    interpolation: str = "bicubic"  # "bilinear" | "bicubic" (PIL filters)
    channel_order: str = "RGB"      # order the network's input channels are in
    crop_rounding: str = "round"    # crop offset: torchvision/timm/mmcv round, Hugging Face floors

    def __post_init__(self):
        if self.interpolation not in ("bilinear", "bicubic"):
            raise OptionError(f"interpolation must be 'bilinear' or 'bicubic', got {self.interpolation!r}")
        if self.channel_order not in ("RGB", "BGR"):
            raise OptionError(f"channel_order must be 'RGB' or 'BGR', got {self.channel_order!r}")
        if self.crop_rounding not in ("round", "floor"):
            raise OptionError(f"crop_rounding must be 'round' or 'floor', got {self.crop_rounding!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_hf_processor(cls, cfg: dict) -> "PreprocessConfig":
        """From a Hugging Face ``preprocessor_config.json`` of MobileViTImageProcessor."""
        size = cfg.get("size", {})
        resize = size.get("shortest_edge", 288) if isinstance(size, dict) else int(size)
        crop = cfg.get("crop_size", {})
        crop = crop.get("height", 256) if isinstance(crop, dict) else int(crop)
        resample = {2: "bilinear", 3: "bicubic"}.get(cfg.get("resample", 2), "bilinear")
        order = "BGR" if cfg.get("do_flip_channel_order", True) else "RGB"
        return cls(crop, resize, resample, order, "floor")


_HF = PreprocessConfig(256, 288, "bilinear", "BGR", "floor")


def preprocess_config_for(fmt: str, family: str, pretrained=None) -> PreprocessConfig:
    """The preprocessing a checkpoint of this layout and family was evaluated with."""
    if pretrained is not None:
        if pretrained.source == "hf":
            return _HF
        return PreprocessConfig(pretrained.input_size, math.floor(pretrained.input_size / pretrained.crop_pct),
                                pretrained.interpolation, pretrained.channel_order)
    if fmt == "hf":            # Apple's hub configs: BGR for v1 and v2 alike
        return _HF
    if fmt == "mmpretrain":    # to_rgb=False, ResizeEdge(288), bilinear
        return PreprocessConfig(256, 288, "bilinear", "BGR")
    if fmt == "cvnets":        # v0.1 (v1 weights): cv2 BGR bilinear; >= v0.2 (v2 weights): PIL RGB bicubic
        return PreprocessConfig(256, 288, "bilinear", "BGR") if family == "v1" else PreprocessConfig()
    # timm and plain state dicts in timm's layout: timm's pretrained_cfg (crop_pct 0.9 / 0.888, bicubic, RGB)
    return PreprocessConfig(256, 284 if family == "v1" else 288, "bicubic", "RGB")


# -------------------------------------------------------------------------------------------------
# Decoding

def load_image(src, *, min_side: int = 1, max_pixels: Optional[int] = None):
    """Open ``src`` (path, bytes, file object, PIL image or HxWx3 uint8 array) as an RGB PIL image.

    Raises InputError for data that is not an image, a truncated file, an image smaller than
    ``min_side`` pixels on a side, or one larger than ``max_pixels`` (decompression bombs; default:
    PIL's own limit).
    """
    from PIL import Image, UnidentifiedImageError

    if isinstance(src, Image.Image):
        img = src
    elif isinstance(src, np.ndarray):
        if src.ndim != 3 or src.shape[2] != 3 or src.dtype != np.uint8:
            raise InputError(f"an image array must be HxWx3 uint8, got shape {src.shape} and {src.dtype}")
        img = Image.fromarray(src, "RGB")
    else:
        if isinstance(src, (bytes, bytearray, memoryview)):
            if len(src) == 0:
                raise InputError("empty image data", "empty")
            fp, name = io.BytesIO(bytes(src)), "image data"
        elif isinstance(src, (str, os.PathLike)):
            if os.path.isdir(src):
                raise InputError(f"{src} is a directory, not an image file", "not_an_image")
            if not os.path.isfile(src):
                raise InputError(f"no such image file: {src}", "empty")
            fp, name = src, str(src)
        elif hasattr(src, "read"):
            fp, name = src, "image stream"
        else:
            raise InputError(f"cannot read an image from {type(src).__name__}")
        limit = max_pixels if max_pixels is not None else Image.MAX_IMAGE_PIXELS
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img = Image.open(fp)
                w, h = img.size
                if limit is not None and w * h > limit:
                    raise InputError(f"{name}: image of {w}x{h} pixels exceeds the limit of {limit} pixels",
                                     "too_large")
                img.load()  # decode now, so a truncated file fails here and not later
        except InputError:
            raise
        except UnidentifiedImageError as e:
            raise InputError(f"{name} is not an image in a format Pillow can read (JPEG, PNG, WebP, ...)",
                             "not_an_image") from e
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            # Pillow refuses before we can read the size, quoting its own limit: quote ours
            declared = re.search(r"\((\d+) pixels\)", str(e))
            size = f"of {int(declared.group(1))} pixels " if declared else ""
            raise InputError(f"{name}: image {size}exceeds the limit of {limit} pixels (a decompression bomb: "
                             f"refused before decoding)", "too_large") from e
        except (OSError, SyntaxError, ValueError) as e:
            raise InputError(f"{name} could not be decoded (truncated or corrupt): {e}", "corrupt") from e
    if min(img.size) < min_side:
        raise InputError(f"image of {img.size[0]}x{img.size[1]} is too small; each side needs at least "
                         f"{min_side} pixels", "too_small")
    return img.convert("RGB") if img.mode != "RGB" else img


# -------------------------------------------------------------------------------------------------
# Transforms

def preprocess(images, cfg: PreprocessConfig) -> torch.Tensor:
    """One image (anything ``load_image`` takes) -> ``[3, S, S]`` float32, or a list of them ->
    ``[B, 3, S, S]``."""
    if isinstance(images, (list, tuple)):
        if not images:
            raise InputError("no images given")
        return torch.stack([preprocess(im, cfg) for im in images])
    from PIL import Image

    img = load_image(images)
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = cfg.resize, int(cfg.resize * long / short)
    size = (new_short, new_long) if w <= h else (new_long, new_short)
    if size != img.size:
        resample = Image.BILINEAR if cfg.interpolation == "bilinear" else Image.BICUBIC
        img = img.resize(size, resample=resample)
    arr = np.asarray(img)
    s = cfg.input_size
    H, W = arr.shape[:2]
    if H < s or W < s:  # only when resize < input_size: pad like torchvision's center_crop
        pad_h, pad_w = max(s - H, 0), max(s - W, 0)
        arr = np.pad(arr, ((pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2), (0, 0)))
        H, W = arr.shape[:2]
    offset = (lambda d: int(round(d / 2.0))) if cfg.crop_rounding == "round" else (lambda d: d // 2)
    top, left = offset(H - s), offset(W - s)
    arr = arr[top:top + s, left:left + s]
    if cfg.channel_order == "BGR":
        arr = arr[..., ::-1]
    # float64 scale then float32, as Hugging Face's rescale does, so the two agree to the bit
    x = (arr.astype(np.float64) * (1 / 255)).astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


# -------------------------------------------------------------------------------------------------
# Labels

@functools.lru_cache(maxsize=1)
def _imagenet_table() -> List[List[str]]:
    text = resources.files("fastmvit").joinpath("data/imagenet_classes.tsv").read_text(encoding="utf-8")
    rows = [line.split("\t", 1) for line in text.splitlines() if line and not line.startswith("#")]
    assert len(rows) == 1000, len(rows)
    return rows


@functools.lru_cache(maxsize=1)
def imagenet_classes() -> List[str]:
    """The 1000 ImageNet-1k class names in training index order ("tench, Tinca tinca", ...)."""
    return [name for _, name in _imagenet_table()]


@functools.lru_cache(maxsize=1)
def imagenet_wnids() -> List[str]:
    """The 1000 ImageNet-1k WordNet ids in training index order ("n01440764", ...): the folder names of
    the ImageNet train and val trees."""
    return [wnid for wnid, _ in _imagenet_table()]


def topk(logits: torch.Tensor, k: int = 5, labels: Optional[Sequence[str]] = None) -> List[List[dict]]:
    """Softmax probabilities of the top ``k`` classes of each row: ``[[{"label", "index", "score"}, ...]]``."""
    if logits.dim() != 2:
        raise InputError(f"expected logits [B, num_classes], got shape {list(logits.shape)}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise OptionError(f"k must be a positive int (more than the classes gives them all), got {k!r}")
    if labels is None and logits.shape[1] == 1000:
        labels = imagenet_classes()
    probs = logits.float().softmax(dim=-1)
    scores, idx = probs.topk(min(k, probs.shape[1]), dim=-1)
    return [[{"label": labels[i] if labels is not None else str(i), "index": int(i), "score": float(p)}
             for p, i in zip(srow.tolist(), irow.tolist())] for srow, irow in zip(scores, idx)]
