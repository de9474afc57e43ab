"""The CPU runtimes that run fastmvit's exported graph: ONNX Runtime and OpenVINO, behind one small
interface. ``runtime.compile(onnx_path, shape, dtype)`` builds once; the returned callable maps a float32 NCHW
numpy batch to a float32 numpy array of logits, and may be called from several threads at once."""
from __future__ import annotations

import functools
import importlib.util
import threading
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import torch

Compiled = Callable[[np.ndarray], np.ndarray]

INSTALL_HINT = "install it with `pip install 'fastmvit[cpu]'`"


class Runtime:
    name = ""
    module = ""
    static_batch = False  # True: one compile per batch size (the shape is fixed), else one for all batches

    def problem(self) -> str:
        """Why this runtime cannot run here ("" when it can). Looks for the package without importing it."""
        if importlib.util.find_spec(self.module) is None:
            return f"{self.name} is not installed: {INSTALL_HINT}"
        return ""

    def supported_dtypes(self) -> tuple:
        return (torch.float32,)

    def compile(self, onnx_path: str, shape: Tuple[int, int, int, int], dtype: torch.dtype) -> Compiled:
        """Build for inputs of ``shape`` (only H and W are fixed unless ``static_batch``), computing in ``dtype``."""
        raise NotImplementedError

    def version(self) -> str:
        from importlib.metadata import version

        return version(self.name)  # "2026.4.1", where openvino.__version__ carries the build hash too


class OnnxRuntime(Runtime):
    """ONNX Runtime's CPU execution provider, all graph optimisations (it folds BatchNorm and fuses
    conv + activation itself). One session serves every batch size: the exported batch axis is dynamic."""

    name, module = "onnxruntime", "onnxruntime"

    def compile(self, onnx_path: str, shape: Tuple[int, int, int, int], dtype: torch.dtype) -> Compiled:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = ort.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"])
        input_name = session.get_inputs()[0].name

        def run(x: np.ndarray) -> np.ndarray:
            return session.run(None, {input_name: x})[0]  # InferenceSession.run is thread-safe

        return run


class OpenVino(Runtime):
    """OpenVINO's CPU plugin with the LATENCY hint, compiled for one static shape (its CPU kernels are
    faster on static shapes than on a dynamic batch). bfloat16 runs as OpenVINO's bf16 inference precision on
    CPUs that have bf16 instructions (AVX512-BF16, AMX): float32 in and out, bf16 inside."""

    name, module = "openvino", "openvino"
    static_batch = True

    @functools.lru_cache(maxsize=None)
    def _core(self):
        import openvino as ov

        return ov.Core()

    def cpu_capabilities(self) -> tuple:
        return tuple(self._core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))

    def supported_dtypes(self) -> tuple:
        return (torch.float32,) + ((torch.bfloat16,) if "BF16" in self.cpu_capabilities() else ())

    def compile(self, onnx_path: str, shape: Tuple[int, int, int, int], dtype: torch.dtype) -> Compiled:
        core = self._core()
        model = core.read_model(onnx_path)
        model.reshape({model.input(0): list(shape)})
        config = {"PERFORMANCE_HINT": "LATENCY",
                  "INFERENCE_PRECISION_HINT": "bf16" if dtype == torch.bfloat16 else "f32"}
        compiled = core.compile_model(model, "CPU", config)
        local = threading.local()  # an infer request runs one inference at a time: one per thread

        def run(x: np.ndarray) -> np.ndarray:
            request = getattr(local, "request", None)
            if request is None:
                request = local.request = compiled.create_infer_request()
            request.infer({0: x}, share_inputs=True)
            return request.get_output_tensor(0).data.copy()  # the request reuses its output buffer

        return run


RUNTIMES: Dict[str, Runtime] = {r.name: r for r in (OpenVino(), OnnxRuntime())}
# backend="auto" on CPU tensors takes the first of these that is installed and supports the dtype:
# OpenVINO measured faster than ONNX Runtime on the same exported graph (bench/results/, README).
AUTO_ORDER = ("openvino", "onnxruntime")


@functools.lru_cache(maxsize=None)
def problem(name: str) -> str:
    return RUNTIMES[name].problem()


@functools.lru_cache(maxsize=None)
def auto_runtime(dtype: torch.dtype) -> Optional[str]:
    """The runtime backend="auto" uses for CPU tensors of ``dtype``, or None (then the torch path runs)."""
    for name in AUTO_ORDER:
        if not problem(name) and dtype in RUNTIMES[name].supported_dtypes():
            return name
    return None
