"""Helpers shared by the tests: random weights with random BatchNorm statistics, reference models."""
import torch
from torch import nn


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Fill every parameter and BatchNorm statistic with random values of realistic scale, so a wrongly
    mapped tensor or a skipped op changes the output (default init would hide both: BN is identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                mod.weight.uniform_(0.5, 1.5, generator=g)
                mod.bias.normal_(0, 0.1, generator=g)
                mod.running_mean.normal_(0, 0.1, generator=g)
                mod.running_var.uniform_(0.5, 1.5, generator=g)
            elif isinstance(mod, (nn.LayerNorm, nn.GroupNorm)):
                mod.weight.uniform_(0.5, 1.5, generator=g)
                mod.bias.normal_(0, 0.1, generator=g)
            elif isinstance(mod, (nn.Conv2d, nn.Linear)):
                mod.weight.normal_(0, mod.weight[0].numel() ** -0.5, generator=g)
                if mod.bias is not None:
                    mod.bias.normal_(0, 0.1, generator=g)
    return model


def images(shape, seed: int = 1) -> torch.Tensor:
    """Random images in [0, 1]."""
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def hf_model(variant, num_labels: int = 1000):
    """The Hugging Face transformers model of a fastmvit variant, randomly initialised (eval mode)."""
    import transformers

    if variant.family == "v1":
        dims = [s.transformer.dim for s in variant.stages[2:]]
        config = transformers.MobileViTConfig(
            hidden_sizes=dims, neck_hidden_sizes=[variant.stem_channels, *variant.stage_channels,
                                                  variant.final_conv_channels],
            expand_ratio=float(variant.stages[0].expand), num_labels=num_labels)
        return transformers.MobileViTForImageClassification(config).eval()
    config = transformers.MobileViTV2Config(width_multiplier=variant.width, num_labels=num_labels)
    return transformers.MobileViTV2ForImageClassification(config).eval()
