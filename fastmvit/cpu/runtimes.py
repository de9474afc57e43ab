"""The CPU runtimes that run fastmvit's exported graph: ONNX Runtime and OpenVINO, behind one small
interface. ``runtime.compile(onnx_path, dtype)`` builds once; the returned callable maps a float32 NCHW
numpy batch to a float32 numpy array of logits, and may be called from several threads at once."""
from __future__ import annotations

import functools
import importlib.util
import os
import threading
import warnings
from typing import Callable, Dict, Optional

import numpy as np
import torch

Compiled = Callable[[np.ndarray], np.ndarray]

INSTALL_HINT = "install it with `pip install 'fastmvit[cpu]'`"


class Runtime:
    name = ""
    module = ""

    def problem(self) -> str:
        """Why this runtime cannot run here ("" when it can). Looks for the package without importing it."""
        if importlib.util.find_spec(self.module) is None:
            return f"{self.name} is not installed: {INSTALL_HINT}"
        return ""

    def supported_dtypes(self) -> tuple:
        return (torch.float32,)

    def compile(self, onnx_path: str, dtype: torch.dtype) -> Compiled:
        """Build the graph (fixed height and width, any batch) to compute in ``dtype``."""
        raise NotImplementedError

    def version(self) -> str:
        from importlib.metadata import version

        return version(self.name)  # "2026.4.1", where openvino.__version__ carries the build hash too


class OnnxRuntime(Runtime):
    """ONNX Runtime's CPU execution provider, all graph optimisations (it folds BatchNorm and fuses
    conv + activation itself). One session serves every batch size: the exported batch axis is dynamic."""

    name, module = "onnxruntime", "onnxruntime"

    def compile(self, onnx_path: str, dtype: torch.dtype) -> Compiled:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = ort.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"])
        input_name = session.get_inputs()[0].name

        def run(x: np.ndarray) -> np.ndarray:
            return session.run(None, {input_name: x})[0]  # InferenceSession.run is thread-safe

        return run


class OpenVino(Runtime):
    """OpenVINO's CPU plugin with the LATENCY hint, compiled once for every batch size (the exported batch
    axis stays dynamic). Not one compile per static shape: OpenVINO 2026.4 computes fastmvit's v1 graph
    wrongly when the shape is static and a stage has 2x2 patches (xxs at 64x64: 2% of the largest logit),
    and a dynamic batch also saves a compile per new batch size.
    bfloat16 runs as OpenVINO's bf16 inference precision on CPUs with bf16 instructions (AVX512-BF16, AMX):
    float32 in and out, bf16 inside."""

    name, module = "openvino", "openvino"

    @functools.lru_cache(maxsize=None)
    def _core(self):
        import openvino as ov

        return ov.Core()

    def cpu_capabilities(self) -> tuple:
        return tuple(self._core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))

    @functools.lru_cache(maxsize=None)  # asked on every call
    def supported_dtypes(self) -> tuple:
        return (torch.float32,) + ((torch.bfloat16,) if "BF16" in self.cpu_capabilities() else ())

    def compile(self, onnx_path: str, dtype: torch.dtype) -> Compiled:
        config = {"PERFORMANCE_HINT": "LATENCY",
                  "INFERENCE_PRECISION_HINT": "bf16" if dtype == torch.bfloat16 else "f32"}
        compiled = self._core().compile_model(onnx_path, "CPU", config)
        local = threading.local()  # an infer request runs one inference at a time: one per thread

        def run(x: np.ndarray) -> np.ndarray:
            request = getattr(local, "request", None)
            if request is None:
                request = local.request = compiled.create_infer_request()
            request.infer({0: x}, share_inputs=True)
            return request.get_output_tensor(0).data.copy()  # the request reuses its output buffer

        return run


RUNTIMES: Dict[str, Runtime] = {r.name: r for r in (OpenVino(), OnnxRuntime())}
# backend="auto" on CPU tensors takes the first of these that is installed and computes in the input's
# dtype; FASTMVIT_CPU_ENGINE chooses another ("onnxruntime" first) or none ("torch": the plain modules).
AUTO_ORDER = ("openvino", "onnxruntime")
ENV = "FASTMVIT_CPU_ENGINE"


@functools.lru_cache(maxsize=None)
def problem(name: str) -> str:
    return RUNTIMES[name].problem()


def auto_runtime(dtype: torch.dtype) -> Optional[str]:
    """The runtime backend="auto" uses for CPU tensors of ``dtype``, or None (the torch path runs)."""
    return _auto_runtime(dtype, os.environ.get(ENV, "auto"))


@functools.lru_cache(maxsize=None)  # so each warning below is given once per process
def _auto_runtime(dtype: torch.dtype, choice: str) -> Optional[str]:
    if choice == "torch":
        return None
    if choice != "auto" and choice not in RUNTIMES:
        raise ValueError(f"{ENV}={choice!r}: use 'auto', 'torch' or one of {tuple(RUNTIMES)}")
    order = AUTO_ORDER if choice == "auto" else (choice,) + tuple(r for r in AUTO_ORDER if r != choice)
    installed = [r for r in order if not problem(r)]
    if not installed:
        warnings.warn("fastmvit: no CPU runtime is installed (" + "; ".join(problem(r) for r in order)
                      + "): CPU tensors run the plain PyTorch modules, several times slower than the CPU "
                        f"engine (set {ENV}=torch to choose that and silence this)", RuntimeWarning, stacklevel=5)
        return None
    if choice != "auto" and problem(choice):
        warnings.warn(f"{ENV}={choice}: {problem(choice)}; using {installed[0]}", RuntimeWarning, stacklevel=5)
    # None when no runtime computes in this dtype here (bfloat16 without bf16 instructions, float16,
    # float64): the torch path then computes in that dtype, as asked.
    return next((r for r in installed if dtype in RUNTIMES[r].supported_dtypes()), None)
