"""CUDA graphs for small batches: capture a forward once per input signature, then replay it.

At batch 1 a MobileViT forward is bound by kernel launches, not arithmetic; a replayed graph launches the
whole forward at once. Each captured signature (shape, dtype, device) owns static input and output buffers;
a call copies its input in, replays, and returns a copy of the output, so callers never see a buffer that
a later call overwrites. Calls are serialised by a lock (one set of static buffers per signature), which
makes the runner safe to share between threads. The cache is bounded (least recently used goes first).
"""
from __future__ import annotations

import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Hashable, Optional

import torch

__all__ = ["GraphRunner", "DEFAULT_MAX_BATCH"]

# Above this batch size launches are a small share of the time and a graph only costs memory.
DEFAULT_MAX_BATCH = 32


@dataclass
class _Captured:
    static_input: torch.Tensor
    static_output: torch.Tensor
    replay: Callable[[], None]


class GraphRunner:
    """Wraps ``fn(x) -> y`` (one tensor in, one tensor out) with a bounded cache of CUDA graphs.

    Args:
        fn: the forward to capture; it must be capturable (no host synchronisation, no new shapes inside).
        max_batch: inputs with a larger batch run ``fn`` directly.
        max_graphs: captured signatures kept (least recently used evicted).
        warmup: uncaptured runs before a capture (lets kernels compile and autotune, and allocators settle).
    """

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], max_batch: int = DEFAULT_MAX_BATCH,
                 max_graphs: int = 8, warmup: int = 2):
        self.fn = fn
        self.max_batch = max_batch
        self.max_graphs = max_graphs
        self.warmup = warmup
        self._graphs: "OrderedDict[Hashable, _Captured]" = OrderedDict()
        self._uncapturable: set = set()
        self._lock = threading.Lock()
        self._pools: dict = {}
        self.captures = 0  # how many captures happened (for tests and `info`)

    # -- policy ------------------------------------------------------------------------------------
    def eligible(self, x: torch.Tensor) -> bool:
        return (x.is_cuda and x.shape[0] <= self.max_batch and not x.requires_grad
                and not torch.cuda.is_current_stream_capturing() and not _compiling())

    @staticmethod
    def key(x: torch.Tensor) -> Hashable:
        return tuple(x.shape), x.dtype, x.device, x.stride()

    # -- call --------------------------------------------------------------------------------------
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.eligible(x):
            return self.fn(x)
        key = self.key(x)
        if key in self._uncapturable:
            return self.fn(x)
        with self._lock, torch.no_grad():
            entry = self._graphs.get(key)
            if entry is None:
                entry = self._capture_or_none(x, key)
                if entry is None:
                    return self.fn(x)
            else:
                self._graphs.move_to_end(key)
            entry.static_input.copy_(x)
            entry.replay()
            return entry.static_output.clone()

    def clear(self) -> None:
        with self._lock:
            self._graphs.clear()
            self._uncapturable.clear()

    def __len__(self) -> int:
        return len(self._graphs)

    # -- capture -----------------------------------------------------------------------------------
    def _capture_or_none(self, x: torch.Tensor, key) -> Optional[_Captured]:
        try:
            entry = self._capture(x)
        except Exception as e:  # an op that cannot be captured: run eagerly from now on, and say so once
            self._uncapturable.add(key)
            warnings.warn(f"fastmvit: CUDA graph capture failed for input {tuple(x.shape)} {x.dtype} "
                          f"({type(e).__name__}: {e}); running without a graph for this shape", stacklevel=3)
            return None
        self._graphs[key] = entry
        self.captures += 1
        while len(self._graphs) > self.max_graphs:
            self._graphs.popitem(last=False)
        return entry

    def _capture(self, x: torch.Tensor) -> _Captured:
        static_input = x.clone()
        side = torch.cuda.Stream(device=x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.fn(static_input)
        torch.cuda.current_stream(x.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # One memory pool per device shared by all its graphs: replays are serialised by the lock and
        # every output is copied out right after its replay, so graphs never need each other's memory.
        pool = self._pools.setdefault(x.device, torch.cuda.graph_pool_handle())
        with torch.cuda.graph(graph, pool=pool):
            static_output = self.fn(static_input)
        return _Captured(static_input, static_output, graph.replay)


def _compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler and getattr(compiler, "is_compiling", lambda: False)())
