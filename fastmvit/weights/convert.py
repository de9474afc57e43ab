"""Recognise a checkpoint's layout and variant, and rename it to fastmvit's canonical (timm) keys."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from ..errors import CheckpointError, OptionError
from ..variants import VARIANTS, Variant, get_variant
from .layouts import FORMATS, key_table

__all__ = ["detect_format", "to_canonical", "from_canonical", "CanonicalWeights"]

# One key that only its layout has, tried in order; Hugging Face's prefix also tells v1 from v2.
_MARKERS = (
    ("timm", "stem.conv.weight"),
    ("hf", "mobilevit.conv_stem.convolution.weight"),
    ("hf", "mobilevitv2.conv_stem.convolution.weight"),
    ("cvnets", "conv_1.block.conv.weight"),
    ("mmpretrain", "backbone.stem.conv.weight"),
)
_HEAD_KEYS = ("head.fc.weight", "head.fc.bias")
_SHOW = 5  # offending keys named in an error


def detect_format(keys) -> str:
    keys = set(keys)
    for fmt, marker in _MARKERS:
        if marker in keys:
            return fmt
    sample = sorted(keys)[:_SHOW]
    raise CheckpointError(
        f"not a MobileViT checkpoint in any known layout (timm, Hugging Face, ml-cvnets, mmpretrain): "
        f"none of their stem keys ({', '.join(m for _, m in _MARKERS)}) is present; first keys: {sample}")


def _family_candidates(fmt: str, keys) -> List[Variant]:
    if fmt == "hf":
        family = "v1" if "mobilevit.conv_stem.convolution.weight" in keys else "v2"
    elif fmt == "mmpretrain":
        family = "v1"
    else:  # a v1 block has a fusion conv, a v2 block a separable-attention qkv_proj
        family = "v1" if any("fusion" in k for k in keys) else "v2"
    return [v for v in VARIANTS.values() if v.family == family]


@dataclass
class _Match:
    variant: Variant
    missing: List[str]
    unexpected: List[str]
    mismatched: List[str]

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    @property
    def score(self) -> int:
        return len(self.missing) + len(self.unexpected) + len(self.mismatched)

    def describe(self) -> str:
        parts = []
        for what, keys in (("missing", self.missing), ("unexpected", self.unexpected),
                           ("shape mismatch", self.mismatched)):
            if keys:
                more = f" (+{len(keys) - _SHOW} more)" if len(keys) > _SHOW else ""
                parts.append(f"{what}: {', '.join(keys[:_SHOW])}{more}")
        return "; ".join(parts)


def _head_classes(tensors: Dict[str, torch.Tensor], fmt: str, variant: Variant) -> Optional[int]:
    (src,) = key_table(variant.name, fmt).to_canonical()["head.fc.weight"]
    return int(tensors[src].shape[0]) if src in tensors else None


def _match(tensors: Dict[str, torch.Tensor], fmt: str, variant: Variant, with_head: bool) -> _Match:
    from .layouts import canonical_shapes

    classes = _head_classes(tensors, fmt, variant) or 1000
    table = key_table(variant.name, fmt, classes)
    shapes = canonical_shapes(variant.name, classes)
    head_srcs = {s for k in _HEAD_KEYS for s in table.to_canonical()[k]}
    missing, mismatched, expected = [], [], set()
    for canon, srcs in table.entries:
        if canon in _HEAD_KEYS and not with_head:
            continue
        want = list(shapes[canon])
        if want:
            want[0] //= len(srcs)  # a split tensor's parts share dim 0
        for src in srcs:
            expected.add(src)
            if src not in tensors:
                if not src.endswith("num_batches_tracked"):  # often dropped by exporters; harmless
                    missing.append(src)
            elif list(tensors[src].shape) != want:
                mismatched.append(f"{src} (checkpoint {list(tensors[src].shape)}, {variant.name} expects {want})")
    unexpected = [k for k in tensors if k not in expected and not (k in head_srcs and not with_head)]
    return _Match(variant, missing, unexpected, mismatched)


@dataclass
class CanonicalWeights:
    fmt: str                         # layout the checkpoint came in
    variant: Variant                 # variant its shapes belong to
    num_classes: int                 # classes of its head (0: it has none)
    state_dict: Dict[str, torch.Tensor]


def to_canonical(tensors: Dict[str, torch.Tensor], variant: Optional[str] = None,
                 num_classes: Optional[int] = 1000) -> CanonicalWeights:
    """Rename a checkpoint's tensors to fastmvit's keys.

    ``variant``: the variant asked for (None: whichever the checkpoint is). ``num_classes``: the head asked
    for; None takes the checkpoint's, 0 drops the head. Raises CheckpointError naming the layout, the
    variant and the first offending keys when the checkpoint does not fit.
    """
    fmt = detect_format(tensors)
    wanted = get_variant(variant) if variant is not None else None
    candidates = _family_candidates(fmt, tensors)
    # A headless checkpoint is matched on its backbone; the num_classes check below explains the head.
    with_head = num_classes != 0 and _head_classes(tensors, fmt, candidates[0]) is not None
    matches = [_match(tensors, fmt, v, with_head) for v in candidates]
    exact = [m for m in matches if m.ok]
    fmt_name = {"hf": "Hugging Face", "cvnets": "ml-cvnets"}.get(fmt, fmt)
    if wanted is not None and wanted.family != candidates[0].family:
        raise CheckpointError(f"checkpoint is a MobileViT{'v2' if candidates[0].family == 'v2' else ''} "
                              f"checkpoint in {fmt_name} layout, but {wanted.name!r} ({wanted.timm_name}) "
                              f"was requested")
    if exact:
        found = exact[0].variant
        if wanted is not None and found is not wanted:
            raise CheckpointError(f"checkpoint is {found.name!r} ({found.timm_name}) in {fmt_name} layout, but "
                                  f"{wanted.name!r} ({wanted.timm_name}) was requested; load it as "
                                  f"fastmvit.load({found.name!r}, weights=...)")
    else:
        m = next(m for m in matches if m.variant is wanted) if wanted else min(matches, key=lambda m: m.score)
        raise CheckpointError(f"checkpoint in {fmt_name} layout does not fit {m.variant.name!r} "
                              f"({m.variant.timm_name}): {m.describe()}")
    v = found
    ckpt_classes = _head_classes(tensors, fmt, v) or 0
    if num_classes is None:
        num_classes = ckpt_classes
    elif num_classes and num_classes != ckpt_classes:
        raise CheckpointError(
            f"checkpoint ({fmt_name}, {v.name!r}) has "
            + (f"a {ckpt_classes}-class head" if ckpt_classes else "no classifier head")
            + f" but num_classes={num_classes} was requested; pass num_classes={ckpt_classes}"
            + (" (or num_classes=0 for pooled features)" if ckpt_classes else " to get pooled features"))
    table = key_table(v.name, fmt, num_classes or 1000)
    state = {}
    for canon, srcs in table.entries:
        if canon in _HEAD_KEYS and not num_classes:
            continue
        if any(s not in tensors for s in srcs):  # only num_batches_tracked may be absent (see _match)
            state[canon] = torch.zeros((), dtype=torch.long)
            continue
        parts = [tensors[s] for s in srcs]
        state[canon] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    return CanonicalWeights(fmt, v, num_classes, state)


def from_canonical(state_dict: Dict[str, torch.Tensor], variant: str, fmt: str) -> Dict[str, torch.Tensor]:
    """Write fastmvit's (timm) state dict in another layout: "timm", "hf", "cvnets" or "mmpretrain"."""
    if fmt not in FORMATS:
        raise OptionError(f"unknown layout {fmt!r}; known: {FORMATS}")
    v = get_variant(variant)
    classes = state_dict["head.fc.weight"].shape[0] if "head.fc.weight" in state_dict else 1000
    out = {}
    for canon, srcs in key_table(v.name, fmt, classes).entries:
        if canon not in state_dict:
            continue
        t = state_dict[canon]
        for src, part in zip(srcs, t.chunk(len(srcs), dim=0) if len(srcs) > 1 else (t,)):
            out[src] = part.clone()
    return out
