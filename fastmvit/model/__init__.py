"""The MobileViT module tree and its plain-PyTorch forward (the reference path)."""
from .layers import NUMERICS_PRESETS, Numerics, resolve_numerics
from .mobilevit import MIN_INPUT_SIZE, MobileViT
from .segmentation import DeepLabV3, SegmentationConfig

__all__ = ["MobileViT", "Numerics", "NUMERICS_PRESETS", "resolve_numerics", "MIN_INPUT_SIZE", "DeepLabV3",
           "SegmentationConfig"]
