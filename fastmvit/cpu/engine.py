"""The CPU engine of one model on one runtime: built once per input signature, called many times."""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Optional

import torch

from . import pick
from .export import exported_onnx, weights_fingerprint
from .runtimes import RUNTIMES, Compiled, auto_runtimes, problem

from ..engine.dispatch import CPU_AUTO as AUTO  # the runtime argument that measures the candidates (pick)

# Built graphs kept per model and runtime, each with its own copy of the weights: a server that sees many
# image sizes keeps the most recently used ones.
MAX_SIGNATURES = 8


class CpuEngine:
    """``engine.run(model, x)``: CPU images [B, 3, H, W] (already checked by ``model.check_input``) ->
    logits [B, num_classes] in x's dtype, computed by ``runtime`` on the graph exported from ``model``;
    ``runtime=AUTO``: by the faster of ``auto_runtimes(dtype)``, measured at each signature's first build
    unless a record of an earlier measurement is on disk.

    Built per signature (height, width, dtype, numerics, threads; one export serves every batch size), at most
    MAX_SIGNATURES kept; the graph is exported once per (weights, numerics, height, width) and kept on disk."""

    def __init__(self, runtime: str):
        if runtime == AUTO:
            self.runtime = None  # per signature: auto_runtimes(dtype), of which dispatch saw several
        else:
            why = problem(runtime)
            if why:
                raise RuntimeError(f"backend={runtime!r}: {why}")
            self.runtime = RUNTIMES[runtime]
        self._built: "OrderedDict[tuple, Compiled]" = OrderedDict()
        self._fingerprint: Optional[str] = None  # of the weights this engine was created with
        self._lock = threading.Lock()

    def run(self, model, x: torch.Tensor) -> torch.Tensor:
        if self.runtime is not None and x.dtype not in self.runtime.supported_dtypes():
            raise RuntimeError(
                f"backend={self.runtime.name!r} cannot compute in {x.dtype} on this CPU (it supports "
                f"{', '.join(map(str, self.runtime.supported_dtypes()))}); use model.float(), or backend='torch' "
                f"or 'auto' (which run the plain PyTorch modules for this dtype)")
        H, W = x.shape[-2:]
        key = (H, W, x.dtype, model.numerics, torch.get_num_threads())  # threads: see runtimes
        compiled = self._built.get(key)
        if compiled is None:
            compiled = self._build(model, key)
        else:
            try:
                self._built.move_to_end(key)  # most recently used: evicted last
            except KeyError:
                pass  # another thread evicted it meanwhile; this call still holds the compiled graph
        out = compiled(x.detach().to(torch.float32).contiguous().numpy())
        return torch.from_numpy(out).to(x.dtype)

    def _build(self, model, key: tuple) -> Compiled:
        with self._lock:
            compiled = self._built.get(key)
            if compiled is None:
                if self._fingerprint is None:
                    self._fingerprint = weights_fingerprint(model)
                path = exported_onnx(model, self._fingerprint, key[:2])
                candidates = (self.runtime.name,) if self.runtime is not None else auto_runtimes(key[2])
                compiled = self._compile(path, candidates, key)
                self._built[key] = compiled
                while len(self._built) > MAX_SIGNATURES:
                    self._built.popitem(last=False)
        return compiled

    @staticmethod
    def _compile(path: str, candidates, key: tuple) -> Compiled:
        """The graph built on the one candidate, the settled recorded choice, or the faster measured now
        (the other dropped; ``fastmvit.cpu.pick``). ``compiled.runtime`` names the runtime kept."""
        dtype, threads = key[2], key[4]
        chosen = candidates[0] if len(candidates) == 1 else None
        record_file = pick.record_path(path, dtype, threads)
        record = None
        if chosen is None:
            record = pick.read_record(record_file, candidates)
            chosen = pick.settled_choice(record)
        if chosen is None:
            built = {name: RUNTIMES[name].compile(path, dtype, threads) for name in candidates}
            median_ms = pick.time_runtimes(built, pick.probe(*key[:2]))
            chosen = pick.record_measurement(record_file, record, candidates, median_ms, pick.machine_load())
            compiled = built.pop(chosen)
            built.clear()  # the slower runtime's graph and weights go now
        else:
            compiled = RUNTIMES[chosen].compile(path, dtype, threads)
        compiled.runtime = chosen
        return compiled

    def runtimes(self) -> dict:
        """{(height, width, dtype, threads): the runtime built} for the signatures built so far."""
        return {(k[0], k[1], k[2], k[4]): c.runtime for k, c in list(self._built.items())}

    def signatures(self) -> list:
        """The signatures built so far, least recently used first (for tests and ``info``)."""
        return list(self._built)
