"""Exceptions fastmvit raises. Each subclasses the built-in a caller would expect (ValueError for bad
values, FileNotFoundError for missing weights), so generic handlers keep working.

Every front end (the Python API, ``python -m fastmvit ...``, the servers) reports a ``FastMViTError`` the
same way; ``message_for(error, front_end)`` gives the text, with the remedy in that front end's terms
(``--weights PATH`` on the command line, ``weights=`` in Python)."""
from __future__ import annotations

from typing import Dict, List, Optional

FRONT_ENDS = ("python", "cli")


class FastMViTError(Exception):
    """Base class of every fastmvit error."""


class OptionError(FastMViTError, ValueError):
    """A bad model name, tag, option or setting; the message says what is accepted."""


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
    """Pretrained weights are neither cached nor downloadable.

    ``problem`` says what failed; ``remedies`` maps a front end ("python", "cli") to the ways out, in that
    front end's terms. ``str(error)`` is the Python API's text; ``message_for(error, "cli")`` the command
    line's."""

    def __init__(self, problem: str, remedies: Optional[Dict[str, List[str]]] = None):
        self.problem = problem
        self.remedies = dict(remedies or {})
        super().__init__(self.explain("python"))

    def explain(self, front_end: str = "python") -> str:
        ways = self.remedies.get(front_end) or self.remedies.get("python") or []
        return self.problem + ("".join(f"\n  - {w}" for w in ways) if ways else "")

    def __reduce__(self):  # crosses process boundaries (a server's workers) with its remedies
        return (type(self), (self.problem, self.remedies))


def message_for(error: BaseException, front_end: str = "cli") -> str:
    """The text a front end shows for ``error``: its remedy in the front end's terms where the error has
    several (``WeightsNotFoundError``), else ``str(error)``."""
    explain = getattr(error, "explain", None)
    return explain(front_end) if callable(explain) else str(error)
