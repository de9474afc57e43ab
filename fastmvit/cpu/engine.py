"""The CPU engine of one model on one runtime: built once per input signature, called many times."""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Optional

import torch

from .export import exported_onnx, weights_fingerprint
from .runtimes import RUNTIMES, Compiled, problem

# Built runtimes kept per model and runtime (each holds its own copy of the folded weights). A server
# that sees many batch sizes on a static-shape runtime recompiles only the least recently used ones.
MAX_SIGNATURES = 16


class CpuEngine:
    """``engine.run(model, x)``: CPU images [B, 3, H, W] (already checked by ``model.check_input``) ->
    logits [B, num_classes] in x's dtype, computed by ``runtime`` on the graph exported from ``model``.

    Built per signature (height, width, dtype, numerics, and the batch size for static-shape runtimes);
    the graph itself is exported once per (height, width, numerics) and cached on disk."""

    def __init__(self, runtime: str):
        why = problem(runtime)
        if why:
            raise RuntimeError(f"backend={runtime!r}: {why}")
        self.runtime = RUNTIMES[runtime]
        self._built: "OrderedDict[tuple, Compiled]" = OrderedDict()
        self._fingerprint: Optional[str] = None  # of the weights this engine was created with
        self._lock = threading.Lock()

    def run(self, model, x: torch.Tensor) -> torch.Tensor:
        if x.dtype not in self.runtime.supported_dtypes():
            raise RuntimeError(
                f"backend={self.runtime.name!r} cannot compute in {x.dtype} on this CPU (it supports "
                f"{', '.join(map(str, self.runtime.supported_dtypes()))}); use model.float(), or backend='torch' "
                f"or 'auto' (which run the plain PyTorch modules for this dtype)")
        B, _, H, W = x.shape
        key = (H, W, x.dtype, model.numerics) + ((B,) if self.runtime.static_batch else ())
        compiled = self._built.get(key)
        if compiled is None:
            compiled = self._build(model, key, (B, 3, H, W), x.dtype)
        else:
            try:
                self._built.move_to_end(key)  # most recently used: evicted last
            except KeyError:
                pass  # another thread evicted it meanwhile; this call still holds the compiled graph
        out = compiled(x.detach().to(torch.float32).contiguous().numpy())
        return torch.from_numpy(out).to(x.dtype)

    def _build(self, model, key: tuple, shape: tuple, dtype: torch.dtype) -> Compiled:
        with self._lock:
            compiled = self._built.get(key)
            if compiled is None:
                if self._fingerprint is None:
                    self._fingerprint = weights_fingerprint(model)
                path = exported_onnx(model, self._fingerprint, shape[2:])
                compiled = self.runtime.compile(path, shape, dtype)
                self._built[key] = compiled
                while len(self._built) > MAX_SIGNATURES:
                    self._built.popitem(last=False)
        return compiled

    def signatures(self) -> list:
        """The signatures built so far, least recently used first (for tests and ``info``)."""
        return list(self._built)
