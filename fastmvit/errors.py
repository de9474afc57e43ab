"""Exceptions fastmvit raises. Each subclasses the built-in a caller would expect (ValueError for bad
values, FileNotFoundError for missing weights), so generic handlers keep working."""


class FastMViTError(Exception):
    """Base class of every fastmvit error."""


class InputError(FastMViTError, ValueError):
    """An input tensor or image the model cannot take (shape, dtype, device, size).

    ``reason`` says which kind, for callers that answer differently (a server's status code): "empty",
    "not_an_image", "corrupt" (truncated or damaged), "too_small", "too_large", or "invalid" (anything
    else: shape, dtype, device)."""

    def __init__(self, message: str, reason: str = "invalid"):
        super().__init__(message)
        self.reason = reason


class CheckpointError(FastMViTError, ValueError):
    """A checkpoint that cannot be read or does not fit the requested model."""


class WeightsNotFoundError(FastMViTError, FileNotFoundError):
    """Pretrained weights are neither cached nor downloadable."""
