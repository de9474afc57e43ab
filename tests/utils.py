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
