"""Helpers shared by the tests: random weights with random BatchNorm statistics, reference models."""
import torch

from fastmvit.model.random import randomize_  # noqa: F401  (re-exported for the tests)


def images(shape, seed: int = 1) -> torch.Tensor:
    """Random images in [0, 1]."""
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def hf_config(variant, num_labels: int = 1000, **options):
    """The Hugging Face transformers config of a fastmvit variant (``options``: output_stride, ...)."""
    import transformers

    if variant.family == "v1":
        dims = [s.transformer.dim for s in variant.stages[2:]]
        return transformers.MobileViTConfig(
            hidden_sizes=dims, neck_hidden_sizes=[variant.stem_channels, *variant.stage_channels,
                                                  variant.final_conv_channels],
            expand_ratio=float(variant.stages[0].expand), num_labels=num_labels, **options)
    return transformers.MobileViTV2Config(width_multiplier=variant.width, num_labels=num_labels, **options)


def hf_model(variant, num_labels: int = 1000):
    """The Hugging Face transformers model of a fastmvit variant, randomly initialised (eval mode)."""
    import transformers

    cls = (transformers.MobileViTForImageClassification if variant.family == "v1"
           else transformers.MobileViTV2ForImageClassification)
    return cls(hf_config(variant, num_labels)).eval()


def hf_segmentation_model(variant, output_stride: int = 16, num_labels: int = 21, **options):
    """Hugging Face's MobileViT[V2]ForSemanticSegmentation of a fastmvit variant, randomly initialised (eval)."""
    import transformers

    cls = (transformers.MobileViTForSemanticSegmentation if variant.family == "v1"
           else transformers.MobileViTV2ForSemanticSegmentation)
    return cls(hf_config(variant, num_labels, output_stride=output_stride, **options)).eval()
