"""The CPU engine: fastmvit's module tree exported to ONNX once per input size (kept on disk) and run by
ONNX Runtime or OpenVINO, the runtimes made for CPU inference. Optional: ``pip install 'fastmvit[cpu]'``.
Importing this package imports neither runtime; the first engine built does."""
from .engine import AUTO, MAX_SIGNATURES, CpuEngine
from .runtimes import AUTO_ORDER, RUNTIMES, auto_runtime, auto_runtimes, auto_summary, problem

__all__ = ["AUTO", "AUTO_ORDER", "CpuEngine", "MAX_SIGNATURES", "RUNTIMES", "auto_runtime", "auto_runtimes",
           "auto_summary", "problem"]
