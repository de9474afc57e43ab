"""Helpers every kernel module shares: interpreter detection, dtype names, compile-check records."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict

import torch

# Triton's type names for the activation dtypes fastmvit runs in.
TRITON_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def interpreting() -> bool:
    """True when kernels run under TRITON_INTERPRET=1 (CPU tests): launchers then pick one large block
    configuration, since the interpreter's cost grows with the number of programs, not their size."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass(frozen=True)
class CompileConfig:
    """One kernel specialisation the engine launches, for ``python -m fastmvit.kernels check`` to compile
    ahead of time for sm_90 / sm_80 without a GPU.

    signature: every argument name -> Triton type ("*fp16", "*fp32", "i32", "fp32", "constexpr").
    constexprs: the values of the constexpr arguments.
    attrs: extra specialisation attributes by argument index, e.g. ``{(3,): [["tt.divisibility", 16]]}``
        for an integer the launcher always passes as a multiple of 16; pointers get 16-byte alignment
        (what torch's allocator guarantees) without saying so.
    """

    name: str
    fn: Any
    signature: Dict[str, str]
    constexprs: Dict[str, Any] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3
    attrs: Dict[Any, Any] = field(default_factory=dict)
