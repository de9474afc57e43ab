"""fastmvit: a drop-in inference engine for MobileViT and MobileViTv2.

    import fastmvit
    model = fastmvit.load("s")          # standard checkpoint; weights=PATH for your own
    logits = model(images)              # [B, 3, H, W] float in [0, 1] -> [B, 1000]

Importing fastmvit imports torch but never initialises CUDA, compiles a kernel or touches the network.
"""
from .api import list_models, load
from .errors import CheckpointError, FastMViTError, InputError, OptionError, WeightsNotFoundError
from .masks import label_map
from .model import DeepLabV3, MobileViT, Numerics
from .preprocess import PreprocessConfig, imagenet_classes, load_image, preprocess, topk
from .variants import VARIANTS, get_variant

__version__ = "0.1.0"

__all__ = [
    "load", "list_models", "MobileViT", "DeepLabV3", "label_map", "Numerics", "VARIANTS", "get_variant",
    "PreprocessConfig", "preprocess", "load_image", "imagenet_classes", "topk",
    "FastMViTError", "InputError", "OptionError", "CheckpointError", "WeightsNotFoundError", "__version__",
]
