"""Every MobileViT variant in one table: the single source of truth for the model, the key maps and
the benchmarks.

Numbers follow ml-cvnets (which timm, Hugging Face and mmpretrain reproduce): see
``../shared/design/mobilevit.md`` sections 1-6.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional
from .errors import OptionError

__all__ = [
    "TransformerSpec", "StageSpec", "Variant", "VARIANTS", "get_variant", "list_variants", "make_divisible",
]


def make_divisible(value: float, divisor: int = 8, min_value: Optional[int] = None) -> int:
    """ml-cvnets / timm channel rounding: nearest multiple of ``divisor``, never more than 10 % below."""
    min_value = min_value or divisor
    new = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if new < 0.9 * value:
        new += divisor
    return new


@dataclass(frozen=True)
class TransformerSpec:
    """The global representation of a MobileViT block (stages 3-5)."""

    dim: int        # d: token width (v1) / attention unit width (v2)
    depth: int      # L: transformer layers
    ffn_dim: int    # hidden width of the feed-forward network
    heads: int = 4  # v1 multi-head attention; v2 separable attention has no heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads


@dataclass(frozen=True)
class StageSpec:
    """One stage: ``num_ir`` inverted residuals (the first with ``stride``), then an optional MobileViT block."""

    out_channels: int
    num_ir: int
    stride: int
    expand: float
    transformer: Optional[TransformerSpec] = None


@dataclass(frozen=True)
class Variant:
    name: str                 # short name: "s", "v2-1.0"
    family: str               # "v1" or "v2"
    timm_name: str            # "mobilevit_s", "mobilevitv2_100"
    stem_channels: int
    stages: tuple             # five StageSpec
    final_conv_channels: int  # v1: 1x1 expansion before pooling; v2: 0 (none)
    params: int               # exact parameter count with a 1000-class head
    gmacs: float              # multiply-accumulates at 256x256, batch 1 (conv + linear + matmul)
    width: float = 1.0        # v2 width multiplier
    hf_repo: Optional[str] = None  # Apple's Hugging Face repository, where one exists

    @property
    def num_features(self) -> int:
        """Channels of the pooled feature vector that the classifier reads."""
        return self.final_conv_channels or self.stages[-1].out_channels

    @property
    def stage_channels(self) -> tuple:
        return tuple(s.out_channels for s in self.stages)

    @property
    def aliases(self) -> tuple:
        names = [self.name, self.timm_name]
        if self.hf_repo:
            names.append(self.hf_repo)
        return tuple(names)


def _v1(name: str, expand: int, channels, dims, final: int, params: int, gmacs: float, hf_repo: str) -> Variant:
    c1, c2, c3, c4, c5 = channels
    stages = (
        StageSpec(c1, 1, 1, expand),
        StageSpec(c2, 3, 2, expand),
    ) + tuple(
        StageSpec(c, 1, 2, expand, TransformerSpec(d, depth, 2 * d, heads=4))
        for c, d, depth in zip((c3, c4, c5), dims, (2, 4, 3))
    )
    return Variant(name, "v1", f"mobilevit_{name}", 16, stages, final, params, gmacs, hf_repo=hf_repo)


def _v2(width: float, params: int, gmacs: float, hf_repo: Optional[str] = None) -> Variant:
    m = width
    stem = make_divisible(min(max(32 * m, 16), 64), 8, 16)
    c1 = make_divisible(64 * m, 16)
    c2, c3, c4, c5 = (make_divisible(c * m, 8) for c in (128, 256, 384, 512))
    dims = [make_divisible(d * m, 8) for d in (128, 192, 256)]
    stages = (
        StageSpec(c1, 1, 1, 2),
        StageSpec(c2, 2, 2, 2),
    ) + tuple(
        StageSpec(c, 1, 2, 2, TransformerSpec(d, depth, (2 * d // 16) * 16, heads=1))
        for c, d, depth in zip((c3, c4, c5), dims, (2, 4, 3))
    )
    timm_name = f"mobilevitv2_{int(round(m * 100)):03d}"
    return Variant(f"v2-{m}", "v2", timm_name, stem, stages, 0, params, gmacs, width=m, hf_repo=hf_repo)


VARIANTS = {
    v.name: v
    for v in (
        _v1("xxs", 2, (16, 24, 48, 64, 80), (64, 80, 96), 320, 1_272_024, 0.407, "apple/mobilevit-xx-small"),
        _v1("xs", 4, (32, 48, 64, 80, 96), (96, 120, 144), 384, 2_317_848, 1.026, "apple/mobilevit-x-small"),
        _v1("s", 4, (32, 64, 96, 128, 160), (144, 192, 240), 640, 5_578_632, 2.001, "apple/mobilevit-small"),
        _v2(0.5, 1_370_593, 0.465),
        _v2(0.75, 2_866_009, 1.028),
        _v2(1.0, 4_901_841, 1.812, "apple/mobilevitv2-1.0-imagenet1k-256"),
        _v2(1.25, 7_478_089, 2.817),
        _v2(1.5, 10_594_753, 4.042),
        _v2(1.75, 14_251_833, 5.489),
        _v2(2.0, 18_449_329, 7.156),
    )
}

_ALIASES = {alias.lower(): v for v in VARIANTS.values() for alias in v.aliases}


def list_variants() -> list:
    """Short names of every variant, smallest v1 first."""
    return list(VARIANTS)


def get_variant(name: str) -> Variant:
    """Resolve a short name ("s", "v2-1.0"), a timm name ("mobilevit_s", with or without a pretrained tag
    such as ".cvnets_in1k") or an Apple Hugging Face repository id."""
    if isinstance(name, Variant):
        return name
    if not isinstance(name, str):
        raise TypeError(f"model name must be a string, got {type(name).__name__}")
    key = name.strip().lower()
    if key.startswith("v2-"):
        try:  # "v2-1" and "v2-1.00" mean "v2-1.0"
            key = f"v2-{float(key[3:])}"
        except ValueError:
            pass
    elif key not in _ALIASES and "." in key:
        key = key.split(".", 1)[0]  # timm "mobilevit_s.cvnets_in1k" -> "mobilevit_s"
    if key in _ALIASES:
        return _ALIASES[key]
    valid = ", ".join(f"{v.name!r} ({v.timm_name})" for v in VARIANTS.values())
    raise OptionError(f"unknown MobileViT variant {name!r}; valid names: {valid}")
