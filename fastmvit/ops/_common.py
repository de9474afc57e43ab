"""What every registered op shares: refusing gradients, and checking NHWC activations."""
from __future__ import annotations

from typing import Optional

import torch

ACTIVATION_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def inference_only(op, name: str) -> None:
    """Make a registered op raise as soon as autograd would need it (at the forward, with a message that
    says what to do), rather than failing obscurely at backward."""

    def setup_context(ctx, inputs, output, **kwargs):
        raise RuntimeError(f"{name} is inference-only (no backward): call it under torch.inference_mode() "
                           f"or torch.no_grad(), or detach its inputs")

    def backward(ctx, *grads):  # never reached: setup_context raises first
        raise RuntimeError(f"{name} is inference-only (no backward)")

    op.register_autograd(backward, setup_context=setup_context)


def check_nhwc(name: str, x: torch.Tensor, channels: Optional[int] = None) -> None:
    """Clear errors for what the NHWC kernels cannot take."""
    if x.dim() != 4:
        raise ValueError(f"{name}: expected an NHWC activation [B, H, W, C], got shape {list(x.shape)}")
    if x.dtype not in ACTIVATION_DTYPES:
        raise TypeError(f"{name}: activations must be float32, float16 or bfloat16, got {x.dtype}")
    if channels is not None and x.shape[-1] != channels:
        raise ValueError(f"{name}: expected {channels} channels in the last dim, got shape {list(x.shape)}")
