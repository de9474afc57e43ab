"""What happens on a GPU: BatchNorm folded and weights packed once per (device, dtype), a plan of fused ops
for the model, and CUDA-graph capture and replay for small batches. ``dispatch`` is the one place that
decides which engine runs a forward (this one, the CPU engine in ``fastmvit.cpu``, or the plain modules).
Importing this package imports no kernel; the first engine built does."""
from .dispatch import BACKENDS, CPU_AUTO, FUSED, TORCH, check_backend, choose_engine
from .engine import Engine, EngineCache, prepare_kernels
from .graphs import DEFAULT_MAX_BATCH, GraphRunner

__all__ = ["BACKENDS", "CPU_AUTO", "DEFAULT_MAX_BATCH", "Engine", "EngineCache", "FUSED", "GraphRunner", "TORCH",
           "check_backend", "choose_engine", "prepare_kernels"]
