"""Which engine runs a forward: decided in one place, by the input's device and dtype and the model's
``backend``. Each engine lives in its own room behind the same small interface (built once per signature,
called many times): the fused Triton engine here in ``fastmvit.engine``, the CPU engine in
``fastmvit.cpu``; the model tree stays the plain reference ("torch")."""
from __future__ import annotations

import torch

from ..errors import OptionError

BACKENDS = ("auto", "triton", "torch", "onnxruntime", "openvino")
CPU_RUNTIMES = ("onnxruntime", "openvino")

TORCH = "torch"    # the plain PyTorch modules
FUSED = "fused"    # the Triton/CUDA engine (fastmvit.engine)
CPU_AUTO = "cpu-auto"  # the CPU engine on the faster of several runtimes, measured (fastmvit.cpu.pick)
# ...or the name of a CPU runtime (fastmvit.cpu)


def check_backend(value) -> None:
    """Raise a clear error for a backend that does not exist or cannot run here (a missing runtime)."""
    if value not in BACKENDS:
        raise OptionError(f"backend must be one of {BACKENDS}, got {value!r}")
    if value in CPU_RUNTIMES:
        from ..cpu import problem

        why = problem(value)
        if why:
            raise RuntimeError(f"backend={value!r}: {why}; backend='auto' runs the best CPU engine installed "
                               f"(or the plain PyTorch modules when there is none)")


def choose_engine(backend: str, x: torch.Tensor) -> str:
    """TORCH, FUSED, a CPU runtime's name, or CPU_AUTO (several runtimes for x's dtype: the CPU engine
    measures which is faster) for a forward on ``x``."""
    if backend == "torch":
        return TORCH
    if backend == "triton":
        return FUSED
    if backend in CPU_RUNTIMES:
        if x.device.type != "cpu":
            raise RuntimeError(f"backend={backend!r} runs on the CPU but the input is on {x.device}: move the "
                               f"model to the CPU, or use backend='auto'")
        if torch.compiler.is_compiling():
            raise RuntimeError(f"torch.compile cannot trace the {backend} engine (it is compiled already): "
                               f"call the model without torch.compile, or compile with backend='torch'")
        return backend
    # "auto"
    if x.is_cuda:
        return FUSED
    if x.device.type != "cpu" or torch.compiler.is_compiling():  # torch.compile traces the reference modules
        return TORCH
    from ..cpu import auto_runtimes

    runtimes = auto_runtimes(x.dtype)
    return TORCH if not runtimes else runtimes[0] if len(runtimes) == 1 else CPU_AUTO
