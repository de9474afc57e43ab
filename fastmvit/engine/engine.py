"""The fused engine of one model: packed weights per (device, dtype), built on first use, plus the CUDA
graphs that replay small batches."""
from __future__ import annotations

import os
import sys
import threading
from typing import Dict, Tuple

import torch

from .dispatch import BACKENDS
from .graphs import DEFAULT_MAX_BATCH, GraphRunner


def prepare_kernels(device: torch.device) -> None:
    """Triton decides at import whether kernels are compiled or interpreted. On CPU tensors they can only
    be interpreted: choose that before the first kernel module is imported, and refuse clearly if the
    kernels were already imported for the GPU in this process."""
    # Triton 3.9 warns that it will stop fusing multiply-adds by default; the kernels' softmax and
    # epilogues are written for fused multiply-adds, so keep them unless the user chose otherwise.
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return
    if "fastmvit.kernels._common" in sys.modules:  # every kernel module (and its @triton.jit helpers) imports it
        raise RuntimeError("backend='triton' on CPU tensors runs the kernels under the Triton interpreter, which "
                           "must be chosen before they are imported: set TRITON_INTERPRET=1 at the start of "
                           "the process (the kernels were already imported for a GPU here)")
    os.environ["TRITON_INTERPRET"] = "1"


class Engine:
    """``engine(x)``: NCHW images [B, 3, H, W] in the engine's dtype -> logits [B, num_classes] (or pooled
    features when the model has no head; for a DeepLabV3, logits [B, num_classes, h, w] as a channels-last
    view), in that dtype.

    Eager calls run the launch plans of ``fastmvit.engine.replay``, resolved on the first call of each input
    signature (at most ``max_plans`` kept, the oldest dropped first); torch.compile traces the registered
    ops instead, and an input that asks for a gradient goes to them too (they refuse it clearly)."""

    max_plans = 64
    check_replays = False  # the tests turn it on: every replayed call is checked against its recording

    def __init__(self, model, device: torch.device, dtype: torch.dtype):
        prepare_kernels(device)
        from . import replay  # imports the kernels: only now, never at package import
        from .plan import build_steps

        self.device, self.dtype = device, dtype
        with torch.no_grad():
            self.steps = build_steps(model, device, dtype)
        self._replay = replay
        self._plans: Dict[tuple, tuple] = {}  # input signature -> (recorded calls, their plans)
        self._plans_lock = threading.Lock()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        replay = self._replay
        if torch.compiler.is_compiling() or (x.requires_grad and torch.is_grad_enabled()):
            return self.forward(x, replay.direct)
        key = (x.shape, x.stride(), x.storage_offset(), x.device)
        entry = self._plans.get(key)
        if entry is None:
            recorder = replay.Recorder()
            y = self.forward(x, recorder)
            with self._plans_lock:
                while len(self._plans) >= self.max_plans:
                    del self._plans[next(iter(self._plans))]
                self._plans[key] = (recorder.calls, [plan for _, plan, _ in recorder.calls])
            return y
        if self.check_replays:
            checked = replay.CheckedReplay(entry[0])
            y = self.forward(x, checked)
            checked.finish()
            return y
        return self.forward(x, replay.Replay(entry[1]))

    def forward(self, x: torch.Tensor, run) -> torch.Tensor:
        """The steps, each calling its ops through ``run`` (``fastmvit.engine.replay``)."""
        for step in self.steps:
            x = step(x, run)
        return x.to(self.dtype)


class EngineCache:
    """The engines and graph runners of one model, keyed by (device, dtype).

    What an engine reads from the model at build, and what drops it when that changes:
    weights, buffers, device, dtype (``MobileViT._apply``, ``load_state_dict``), BatchNorm statistics
    (``MobileViT.train``), the numerics (``set_numerics``; an assigned ``model.numerics`` is noticed here),
    the CUDA-graph settings (``cuda_graph_max_batch`` / ``cuda_graphs``). Parameters or submodules edited in
    place and the FASTMVIT_DWCONV choice need ``model.invalidate_engine()``."""

    def __init__(self):
        self._runners: Dict[Tuple[torch.device, torch.dtype], GraphRunner] = {}
        self._cpu: Dict[str, "CpuEngine"] = {}  # fastmvit.cpu engines by runtime, dropped with the rest
        self._lock = threading.Lock()
        self._numerics = None  # the model.numerics object the engines were built with

    def runner(self, model, x: torch.Tensor) -> GraphRunner:
        if model.numerics is not self._numerics:  # an identity test: cheap on every call
            self.clear()
        key = (x.device, x.dtype)
        runner = self._runners.get(key)
        if runner is None:
            runner = self._build(model, x.device, x.dtype)
        return runner

    def engine(self, model, x: torch.Tensor) -> Engine:
        """The engine alone, for torch.compile to trace (it brings its own CUDA graphs: mode="reduce-overhead").
        Packing runs once, eagerly, even when it is first reached inside the trace (a graph break)."""
        if model.numerics is not self._numerics:
            torch.compiler.disable(self.clear)()
        runner = self._runners.get((x.device, x.dtype))
        if runner is None:
            runner = torch.compiler.disable(self._build)(model, x.device, x.dtype)
        return runner.fn

    def _build(self, model, device, dtype) -> GraphRunner:
        with self._lock:
            runner = self._runners.get((device, dtype))
            if runner is None:
                self._numerics = model.numerics
                runner = GraphRunner(Engine(model, device, dtype), max_batch=model.cuda_graph_max_batch)
                self._runners[(device, dtype)] = runner
        return runner

    def cpu(self, runtime: str) -> "CpuEngine":
        """The CPU engine on ``runtime`` ("onnxruntime", "openvino"): it builds per input signature itself."""
        engine = self._cpu.get(runtime)
        if engine is None:
            from ..cpu import CpuEngine

            with self._lock:
                engine = self._cpu.setdefault(runtime, CpuEngine(runtime))
        return engine

    def cpu_runtimes(self) -> dict:
        """{(height, width, dtype, threads): runtime} of every CPU engine signature built."""
        out = {}
        for engine in list(self._cpu.values()):
            out.update(engine.runtimes())
        return out

    def clear(self) -> None:
        with self._lock:
            for runner in self._runners.values():
                runner.clear()  # waits for replays still using the graphs' buffers
            self._runners.clear()
            self._cpu.clear()
            self._numerics = None

    # A copied or pickled model starts with an empty cache (locks and CUDA graphs do not copy).
    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.__init__()


__all__ = ["BACKENDS", "DEFAULT_MAX_BATCH", "Engine", "EngineCache", "prepare_kernels"]
