"""Folding inference-time affine ops into the weights before them."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn


def fold_bn(weight: torch.Tensor, bn: nn.BatchNorm2d, bias: Optional[torch.Tensor] = None
            ) -> Tuple[torch.Tensor, torch.Tensor]:
    """conv(x, W) + b followed by eval-mode BatchNorm == conv(x, W * s) + (b - mean) * s + beta, with
    s = gamma / sqrt(var + eps). Computed in float64 so folding adds no error of its own.
    Returns (weight, bias) in float32."""
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    b = bias.double() if bias is not None else torch.zeros_like(scale)
    w = weight.double() * scale.reshape(-1, *([1] * (weight.dim() - 1)))
    new_bias = (b - bn.running_mean.double()) * scale + bn.bias.double()
    return w.float(), new_bias.float()
