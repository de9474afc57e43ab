"""What happens on a GPU: BatchNorm folded and weights packed once per (device, dtype), a plan of fused ops
for the model, and CUDA-graph capture and replay for small batches. Importing this package imports no
kernel; the first engine built does."""
from .engine import BACKENDS, Engine, EngineCache, prepare_kernels, uses_engine
from .graphs import DEFAULT_MAX_BATCH, GraphRunner

__all__ = ["BACKENDS", "DEFAULT_MAX_BATCH", "Engine", "EngineCache", "GraphRunner", "prepare_kernels",
           "uses_engine"]
