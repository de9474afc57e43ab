"""CUDA graphs: capture a forward once per input signature, then replay it.

A MobileViT forward is some 70 kernel launches; below a few hundred images per batch the GPU would
otherwise wait for Python to enqueue them. A replayed graph enqueues the whole forward at once. Each
captured signature (shape, dtype, device, strides) owns static input and output buffers; a call copies
its input in, replays, and returns a copy of the output, so callers never see a buffer a later call
overwrites. The cache is bounded by count (least recently used goes first) and by memory (below).

Which batches get a graph is decided by memory, not by a fixed batch size. All graphs of a device share
one memory pool, which holds the largest captured forward's activations (about what the caching
allocator keeps after running that batch eagerly) plus every signature's output. The pool's growth is
measured at each capture; a signature is captured while the pool stays within ``memory_fraction`` of the
device's memory (predicted from the bytes per image measured at earlier captures of that image size),
and a capture that pushes the pool over drops the device's graphs and remembers the batch as too large.

Contract, for threads and streams (``GraphRunner.__call__``):

- Work runs on the input's device whatever device is current (the call is guarded once, here, for the
  whole forward, graphed or not: every Triton launch and capture goes to ``x.device``), and on the
  caller's current stream of that device (``torch.cuda.current_stream(x.device)``); the returned tensor
  is produced on that stream, ordered like the result of any eager op.
- One runner may be shared by any number of threads, each on its own stream: results are always right.
  The static buffers and the shared pool are used by one replay at a time, in host order (a lock) and on
  the GPU: each replay's stream first waits for the event recorded after the previous replay's output
  copy, whichever stream that was. Replays of one runner on one device therefore do not overlap each
  other; eager (ungraphed) calls overlap freely.
- Capture uses ``capture_error_mode="thread_local"`` and a capture stream of the input's device: eager
  CUDA work in other threads during a capture neither breaks it nor ends up in it.
- Any grad mode, in any order: ``torch.inference_mode()``, ``torch.no_grad()`` or none (the engine's
  parameters are frozen). The static buffers are ordinary tensors whatever mode the capture ran in, so a
  later call in another mode can still copy into them.
"""
from __future__ import annotations

import contextlib
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Dict, Hashable, Optional, Tuple

import torch

__all__ = ["GraphRunner", "DEFAULT_MAX_BATCH", "DEFAULT_MEMORY_FRACTION", "device_guard"]

# No fixed batch limit: memory decides (see the module docstring). A model's ``cuda_graph_max_batch``
# can still set one.
DEFAULT_MAX_BATCH: Optional[int] = None
# Share of a device's memory the graphs of one runner may hold (their pool and static buffers).
DEFAULT_MEMORY_FRACTION = 0.25


def device_guard(x: torch.Tensor):
    """Make ``x``'s device current for the enclosed work (Triton launches on the current device and its
    current stream); nothing for CPU tensors. One guard per forward, not one per launch."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


@dataclass
class _Captured:
    static_input: torch.Tensor
    static_output: torch.Tensor
    replay: Callable[[], None]
    pool_growth: int = 0   # bytes the shared pool grew by at this capture


class GraphRunner:
    """Wraps ``fn(x) -> y`` (one tensor in, one tensor out) with a bounded cache of CUDA graphs.

    Args:
        fn: the forward to capture; it must be capturable (no host synchronisation, no new shapes inside).
        max_batch: inputs with a larger batch run ``fn`` directly; None: no limit but memory.
        max_graphs: captured signatures kept (least recently used evicted).
        memory_fraction: share of the device's memory the shared graph pool may grow to.
        warmup: uncaptured runs before a capture (lets kernels compile, and allocators settle).
    """

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], max_batch: Optional[int] = DEFAULT_MAX_BATCH,
                 max_graphs: int = 8, memory_fraction: float = DEFAULT_MEMORY_FRACTION, warmup: int = 2):
        if max_batch is not None and max_batch < 0:
            raise ValueError(f"max_batch must be None (no limit) or >= 0, got {max_batch}")
        if not 0 < memory_fraction <= 1:
            raise ValueError(f"memory_fraction must be in (0, 1], got {memory_fraction}")
        self.fn = fn
        self.max_batch = max_batch
        self.max_graphs = max_graphs
        self.memory_fraction = memory_fraction
        self.warmup = warmup
        self._graphs: "OrderedDict[Hashable, _Captured]" = OrderedDict()
        self._uncapturable: set = set()
        self._lock = threading.Lock()
        self._pools: dict = {}                  # device -> graph pool handle
        self._pool_bytes: Dict[object, int] = {}  # device -> measured growth of its pool
        self._capture_streams: dict = {}       # device -> stream captures run on
        self._done: dict = {}                  # device -> event after the last replay's output copy
        # (image shape, dtype, device) -> least pool bytes per image seen; and the smallest batch that
        # overflowed the budget
        self._bytes_per_image: Dict[Hashable, float] = {}
        self._too_large: Dict[Hashable, int] = {}
        self.captures = 0  # how many captures happened (for tests and `info`)

    # -- policy ------------------------------------------------------------------------------------
    def eligible(self, x: torch.Tensor) -> bool:
        return (x.is_cuda and (self.max_batch is None or x.shape[0] <= self.max_batch) and not x.requires_grad
                and not torch.cuda.is_current_stream_capturing() and not _compiling())

    @staticmethod
    def key(x: torch.Tensor) -> Hashable:
        return tuple(x.shape), x.dtype, x.device, x.stride()

    @staticmethod
    def _size_class(x: torch.Tensor) -> Hashable:
        return tuple(x.shape[1:]), x.dtype, x.device

    def memory_budget(self, device) -> int:
        """Bytes the shared pool of ``device`` may grow to."""
        return int(self.memory_fraction * torch.cuda.get_device_properties(device).total_memory)

    def _fits(self, x: torch.Tensor) -> bool:
        """Whether capturing ``x``'s signature should keep the pool within budget, from what earlier
        captures measured (an image size never captured before is tried, and checked after)."""
        size, batch = self._size_class(x), x.shape[0]
        if batch >= self._too_large.get(size, float("inf")):
            return False
        per_image = self._bytes_per_image.get(size)
        if per_image is None:
            return True
        return per_image * batch <= self.memory_budget(x.device)

    # -- call --------------------------------------------------------------------------------------
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with device_guard(x):
            if not self.eligible(x):
                return self.fn(x)
            key = self.key(x)
            if key in self._uncapturable:
                return self.fn(x)
            with self._lock, torch.no_grad():
                entry = self._graphs.get(key)
                if entry is None:
                    entry = self._capture_or_none(x, key) if self._fits(x) else None
                    if entry is None:
                        return self.fn(x)
                else:
                    self._graphs.move_to_end(key)
                return self._replay(entry, x)

    def _replay(self, entry: _Captured, x: torch.Tensor) -> torch.Tensor:
        """Copy in, replay, copy out on the caller's stream, after the previous replay on this device
        (possibly on another stream) has copied its output out."""
        stream = self._current_stream(x.device)
        done = self._done.get(x.device)
        if done is not None:
            stream.wait_event(done)
        entry.static_input.copy_(x)
        entry.replay()
        out = entry.static_output.clone()
        if done is None:
            done = self._done[x.device] = self._new_event()
        done.record(stream)
        return out

    def clear(self) -> None:
        with self._lock:
            self._wait_for_replays()
            self._graphs.clear()
            self._uncapturable.clear()
            self._pools.clear()
            self._pool_bytes.clear()
            self._too_large.clear()

    def __len__(self) -> int:
        return len(self._graphs)

    def pool_bytes(self, device) -> int:
        """Measured size of ``device``'s shared graph pool (the sum of its growth at each capture)."""
        return self._pool_bytes.get(torch.device(device), 0)

    # -- capture -----------------------------------------------------------------------------------
    def _capture_or_none(self, x: torch.Tensor, key) -> Optional[_Captured]:
        try:
            entry = self._capture(x)
        except Exception as e:  # an op that cannot be captured: run eagerly from now on, and say so once
            self._uncapturable.add(key)
            warnings.warn(f"fastmvit: CUDA graph capture failed for input {tuple(x.shape)} {x.dtype} "
                          f"({type(e).__name__}: {e}); running without a graph for this shape", stacklevel=4)
            return None
        self.captures += 1
        dev, size, batch = x.device, self._size_class(x), x.shape[0]
        pool = self._pool_bytes[dev] = self._pool_bytes.get(dev, 0) + entry.pool_growth
        # The pool now covers this batch's activations: an upper bound per image for this image size.
        self._bytes_per_image[size] = min(self._bytes_per_image.get(size, float("inf")), pool / batch)
        if pool > self.memory_budget(dev):
            # Over budget: the pool only shrinks when all its graphs go. Drop this device's graphs (the
            # next captures start a new pool) and never capture this batch size again.
            self._too_large[size] = min(self._too_large.get(size, batch), batch)
            self._drop_device(dev)
            return None
        self._graphs[key] = entry
        while len(self._graphs) > self.max_graphs:
            self._wait_for_replays()
            self._graphs.popitem(last=False)
        return entry

    def _drop_device(self, device) -> None:
        self._wait_for_replays()
        for k in [k for k in self._graphs if k[2] == device]:
            del self._graphs[k]
        self._pools.pop(device, None)
        self._pool_bytes.pop(device, None)

    def _wait_for_replays(self) -> None:
        """Before static buffers go back to the allocator: every replay that used them has finished."""
        for event in self._done.values():
            event.synchronize()

    def _capture(self, x: torch.Tensor) -> _Captured:
        static_input = self._static_like(x)
        static_input.copy_(x)
        static_output, replay, growth = self._record(static_input)
        return _Captured(static_input, static_output, replay, growth)

    @staticmethod
    def _static_like(x: torch.Tensor) -> torch.Tensor:
        """A buffer shaped and strided like ``x`` that is an ordinary tensor even when the caller is in
        ``torch.inference_mode()`` (an inference tensor could not be updated in place under no_grad or
        plain grad mode, so a later replay in another mode would fail)."""
        with torch.inference_mode(False):
            return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)

    def _record(self, static_input: torch.Tensor) -> Tuple[torch.Tensor, Callable[[], None], int]:
        """Capture ``fn(static_input)``: (static output, replay, bytes the shared pool grew by)."""
        device = static_input.device
        caller = torch.cuda.current_stream(device)
        side = torch.cuda.Stream(device=device)
        side.wait_stream(caller)
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.fn(static_input)
        caller.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # One pool per device shared by all its graphs: replays are serialised on the GPU (``_replay``) and
        # every output is copied out right after its replay, so graphs never need each other's memory.
        pool = self._pools.setdefault(device, torch.cuda.graph_pool_handle())
        # torch.cuda.graph's default capture stream belongs to whichever device was current at the first
        # capture in the process: give each device its own.
        stream = self._capture_streams.setdefault(device, torch.cuda.Stream(device=device))
        before = torch.cuda.memory_reserved(device)
        # (entering torch.cuda.graph synchronises the device: no replay on another stream is still using
        # the pool)
        with torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
            static_output = self.fn(static_input)
        growth = max(0, torch.cuda.memory_reserved(device) - before)
        return static_output, graph.replay, growth

    # -- stream helpers (CPU tests replace them) ---------------------------------------------------
    @staticmethod
    def _current_stream(device):
        return torch.cuda.current_stream(device)

    @staticmethod
    def _new_event():
        return torch.cuda.Event()


def _compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler and getattr(compiler, "is_compiling", lambda: False)())
