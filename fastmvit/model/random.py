"""Random weights that exercise every tensor: what the parity tests and the benchmarks run on."""
import torch
from torch import nn


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Fill every parameter and BatchNorm statistic with seeded random values of realistic scale, in place.

    Default initialisation would hide mistakes: BatchNorm starts as an identity and LayerNorm/GroupNorm
    affines as ones and zeros, so a wrongly mapped or skipped tensor would not change the output."""
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
