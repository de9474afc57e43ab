"""Segmentation outputs: label maps from logits, PASCAL VOC class names and colours, mask PNGs and colour
overlays, and a whole-image prediction helper (what ``python -m fastmvit predict`` writes)."""
from __future__ import annotations

import io
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .errors import InputError

__all__ = ["VOC_CLASSES", "voc_palette", "label_map", "whole_image_array", "mask_png", "overlay", "segment_image", "write_masks",
           "print_written_masks"]

# PASCAL VOC 2012 in training index order (Apple's DeepLabV3 checkpoints and their HF id2label).
VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)


def voc_palette(n: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map ``[n, 3]`` uint8: class i's bits spread over the high bits of R, G and B
    (0 black, 1 dark red, 2 dark green, ...), as VOC's own label PNGs use."""
    out = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for shift in range(7, -1, -1):
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        out[i] = (r, g, b)
    return out


# Upsampled logits larger than this are resized one class at a time (see label_map).
LABEL_MAP_CHUNK_BYTES = 64 * 2**20


def label_map(logits: torch.Tensor, size: Optional[Tuple[int, int]] = None,
              align_corners: bool = False, *, max_bytes: int = LABEL_MAP_CHUNK_BYTES,
              dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """Class index of every pixel: ``[B, C, h, w]`` logits -> ``[B, H, W]`` ``dtype``, bilinearly resized to
    ``size`` = (H, W) first when given (Hugging Face's ``post_process_semantic_segmentation`` resizes with
    ``align_corners=False``; ml-cvnets' head with True).

    Memory stays bounded for large images and many classes: when the resized logits would take more than
    ``max_bytes``, they are resized one class at a time and a running maximum keeps the best class (the
    first on ties, as ``argmax``), so at most about three ``[B, H, W]`` planes exist at once instead of
    ``C`` of them. Each class's plane is the one ``F.interpolate`` computes for all of them together, so
    the labels are the same either way. ``dtype``: ``torch.uint8`` suffices below 256 classes."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 4:
        shape = list(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise InputError(f"expected segmentation logits [B, num_classes, h, w], got {shape}")
    if size is None or tuple(size) == tuple(logits.shape[-2:]):
        return logits.argmax(dim=1).to(dtype)
    size = tuple(int(s) for s in size)
    B, C = logits.shape[:2]
    if B * C * size[0] * size[1] * 4 <= max_bytes:
        return F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=align_corners) \
            .argmax(dim=1).to(dtype)

    def plane(c: int) -> torch.Tensor:  # [B, H, W]; one channel: interpolate's own arithmetic, bit for bit
        return F.interpolate(logits[:, c:c + 1].float(), size=size, mode="bilinear",
                             align_corners=align_corners)[:, 0]

    best = plane(0)
    labels = torch.zeros(best.shape, dtype=dtype, device=logits.device)
    for c in range(1, C):
        p = plane(c)
        better = p > best  # strictly: a tie keeps the earlier class, as argmax does
        labels.masked_fill_(better, c)
        torch.maximum(best, p, out=best)
    return labels


def _labels_array(labels) -> np.ndarray:
    arr = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if arr.ndim != 2:
        raise InputError(f"expected one label map [H, W], got shape {list(arr.shape)}")
    if arr.size and (arr.min() < 0 or arr.max() > 65535):
        raise InputError(f"label values must be in [0, 65535] to fit a PNG, got {arr.min()}..{arr.max()}")
    return arr


def mask_png(labels) -> bytes:
    """One label map ``[H, W]`` as PNG bytes whose pixel values are the class indices: an 8-bit palette PNG
    (VOC colours, so it also looks right in a viewer) when every index is below 256, else 16-bit grey."""
    from PIL import Image

    arr = _labels_array(labels)
    if arr.size == 0 or arr.max() < 256:
        img = Image.fromarray(arr.astype(np.uint8), mode="P")
        img.putpalette(voc_palette().tobytes())
    else:
        img = Image.fromarray(arr.astype(np.uint16))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def overlay(image, labels, alpha: float = 0.5):
    """The RGB image with each pixel blended with its class colour (background, class 0, left untouched)."""
    from PIL import Image

    arr = _labels_array(labels)
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    if rgb.shape[:2] != arr.shape:
        raise InputError(f"label map {arr.shape[1]}x{arr.shape[0]} does not match the image "
                         f"{rgb.shape[1]}x{rgb.shape[0]} (width x height)")
    colours = voc_palette(max(256, int(arr.max()) + 1))[arr].astype(np.float32)
    blend = np.where((arr > 0)[..., None], (1 - alpha) * rgb + alpha * colours, rgb)
    return Image.fromarray(np.clip(np.rint(blend), 0, 255).astype(np.uint8), "RGB")


def whole_image_array(img, cfg) -> np.ndarray:
    """Resize the shorter side to the model's input size (no crop, so the mask covers the whole image),
    order the channels and scale to [0, 1] as ``fastmvit.preprocess`` does: ``[3, h, w]`` float32 NumPy
    (no torch op: the serving plug-ins decode with it in their HTTP processes)."""
    from PIL import Image

    w, h = img.size
    scale = cfg.input_size / min(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    if size != img.size:
        img = img.resize(size, Image.BILINEAR if cfg.interpolation == "bilinear" else Image.BICUBIC)
    arr = np.asarray(img)
    if cfg.channel_order == "BGR":
        arr = arr[..., ::-1]
    x = (arr.astype(np.float64) * (1 / 255)).astype(np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def _whole_image(img, cfg) -> torch.Tensor:
    return torch.from_numpy(whole_image_array(img, cfg))


def segment_image(model, image) -> torch.Tensor:
    """Label map ``[H, W]`` of one image (anything ``fastmvit.load_image`` takes) at the image's own size."""
    from .preprocess import load_image

    img = load_image(image)
    cfg = model.pretrained_cfg["preprocess"]
    p = next(model.parameters())
    x = _whole_image(img, cfg).unsqueeze(0).to(device=p.device, dtype=p.dtype)
    with torch.inference_mode():
        logits = model(x)
    return label_map(logits, size=(img.size[1], img.size[0]),
                     align_corners=model.pretrained_cfg.get("upsample_align_corners", False))[0]


def _write_one(model, src, out_dir) -> Tuple[torch.Tensor, Path, Path]:
    from .preprocess import load_image

    src = Path(src)
    labels = segment_image(model, src)
    folder = Path(out_dir) if out_dir is not None else src.parent
    folder.mkdir(parents=True, exist_ok=True)
    mask_path, overlay_path = folder / f"{src.stem}_mask.png", folder / f"{src.stem}_overlay.png"
    mask_path.write_bytes(mask_png(labels))
    overlay(load_image(src), labels).save(overlay_path)
    return labels, mask_path, overlay_path


def write_masks(model, images: Sequence, out_dir=None) -> List[Tuple[Path, Path]]:
    """For each image file write ``<stem>_mask.png`` (class indices) and ``<stem>_overlay.png`` (colours over
    the image) into ``out_dir`` (default: beside the image); returns the pairs of paths written."""
    return [_write_one(model, src, out_dir)[1:] for src in images]


def print_written_masks(model, images: Sequence, out_dir=None) -> int:
    """``python -m fastmvit predict`` for a segmentation model: write the masks and print, per image, where
    they went and the classes found by pixel share."""
    names = model.pretrained_cfg.get("labels")
    for src in images:
        labels, mask_path, overlay_path = _write_one(model, src, out_dir)
        counts = torch.bincount(labels.flatten().cpu())
        found = sorted(((int(n), i) for i, n in enumerate(counts.tolist()) if n), reverse=True)
        text = ", ".join(f"{names[i] if names and i < len(names) else i} {n / labels.numel():.0%}"
                         for n, i in found)
        print(f"{src}\n  mask: {mask_path}\n  overlay: {overlay_path}\n  classes: {text}")
    return 0
