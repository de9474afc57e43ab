"""The CPU runtimes that run fastmvit's exported graph: ONNX Runtime and OpenVINO, behind one small
interface. ``runtime.compile(onnx_path, dtype, threads)`` builds once; the returned callable maps a float32
NCHW numpy batch to a float32 numpy array of logits, and may be called from several threads at once.

Both runtimes get ``torch.get_num_threads()`` threads (the engine's build key holds the count), so
``torch.set_num_threads`` governs the CPU engine as it governs the torch path."""
from __future__ import annotations

import functools
import importlib.util
import os
import threading
import warnings
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import torch

from ..errors import OptionError

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

    def compile(self, onnx_path: str, dtype: torch.dtype, threads: int) -> Compiled:
        """Build the graph (fixed height and width, any batch) to compute in ``dtype`` on ``threads``
        threads. The callable's ``built`` attribute is the runtime's own object (for tests)."""
        raise NotImplementedError

    def version(self) -> str:
        from importlib.metadata import version

        return version(self.name)  # "2026.4.1", where openvino.__version__ carries the build hash too


class OnnxRuntime(Runtime):
    """ONNX Runtime's CPU execution provider, all graph optimisations (it folds BatchNorm and fuses
    conv + activation itself). One session serves every batch size: the exported batch axis is dynamic."""

    name, module = "onnxruntime", "onnxruntime"
    # Without this ONNX Runtime's worker threads busy-wait after every run (measured: ~60 ms of a core on
    # this 2-core machine), taking that time from whatever the process or machine runs next.
    SESSION_CONFIG = {"session.intra_op.allow_spinning": "0", "session.inter_op.allow_spinning": "0"}

    def session_options(self, threads: int):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1  # sequential execution: the inter-op pool would idle
        for key, value in self.SESSION_CONFIG.items():
            options.add_session_config_entry(key, value)
        return options

    def compile(self, onnx_path: str, dtype: torch.dtype, threads: int) -> Compiled:
        import onnxruntime as ort

        session = ort.InferenceSession(onnx_path, self.session_options(threads), providers=["CPUExecutionProvider"])
        input_name = session.get_inputs()[0].name

        def run(x: np.ndarray) -> np.ndarray:
            return session.run(None, {input_name: x})[0]  # InferenceSession.run is thread-safe

        run.built = session
        return run


class OpenVino(Runtime):
    """OpenVINO's CPU plugin with the LATENCY hint. Each batch size gets its own static-shape build, for the
    first MAX_STATIC_BATCHES batch sizes a graph is called with (built at that size's first call, 0.2-0.3 s
    for S at 256x256); further batch sizes share one dynamic-batch build. Static is faster (2-core Xeon with
    AMX, float32 256x256, ms static / dynamic: S b1 25.0 / 27.3, b8 208 / 212; v2-1.0 b1 28.2 / 31.1; bf16
    S b8 92.7 / 108), and each build holds its own activation buffers and a copy of the weights (S at
    256x256: +80 MB at batch 1, +100 MB at batch 8), hence the bound.

    OpenVINO 2026.4's snippets (its JIT-fused subgraphs, used by static builds) compute v1's packed q|k|v
    attention wrongly for short sequences; the exported graph avoids that form (fastmvit.cpu.export,
    bench/openvino_snippets_check.py), and tests compare static builds with the torch path at such sizes.

    bfloat16 runs as OpenVINO's bf16 inference precision on CPUs with bf16 instructions (AVX512-BF16, AMX):
    float32 in and out, bf16 inside."""

    name, module = "openvino", "openvino"
    MAX_STATIC_BATCHES = 4

    @functools.lru_cache(maxsize=None)
    def _core(self):
        import openvino as ov

        return ov.Core()

    def cpu_capabilities(self) -> tuple:
        return tuple(self._core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))

    @functools.lru_cache(maxsize=None)  # asked on every call
    def supported_dtypes(self) -> tuple:
        return (torch.float32,) + ((torch.bfloat16,) if "BF16" in self.cpu_capabilities() else ())

    def config(self, dtype: torch.dtype, threads: int) -> dict:
        return {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads,
                "INFERENCE_PRECISION_HINT": "bf16" if dtype == torch.bfloat16 else "f32"}

    def compile(self, onnx_path: str, dtype: torch.dtype, threads: int) -> Compiled:
        return _OpenVinoGraph(self._core(), self._core().read_model(onnx_path), self.config(dtype, threads),
                              self.MAX_STATIC_BATCHES)


class _OpenVinoGraph:
    """One exported graph on OpenVINO: ``graph(x)`` runs x's batch size on that size's static build, or on
    the shared dynamic-batch build once ``max_static`` batch sizes have static builds. ``built``: {batch
    size, or None for the dynamic build: compiled model}."""

    def __init__(self, core, source, config: dict, max_static: int):
        self._core, self._source, self._config, self._max_static = core, source, config, max_static
        self.built: dict = {}
        self._for_batch: dict = {}  # batch size -> the compiled model that runs it
        self._lock = threading.Lock()  # builds one at a time; a batch size once routed never takes it
        self._local = threading.local()  # an infer request runs one inference at a time: one per thread

    def _compiled(self, batch: int):
        compiled = self._for_batch.get(batch)
        if compiled is None:
            with self._lock:
                compiled = self._for_batch.get(batch)
                if compiled is None:
                    compiled = self._for_batch[batch] = self._build(batch)
        return compiled

    def _build(self, batch: int):
        """A static build for ``batch`` while there is room, else the dynamic one (built once)."""
        if len(self.built) - (None in self.built) < self._max_static:
            model = self._source.clone()
            model.reshape([batch] + [d.get_length() for d in list(self._source.inputs[0].partial_shape)[1:]])
            self.built[batch] = self._core.compile_model(model, "CPU", self._config)
            return self.built[batch]
        if None not in self.built:
            self.built[None] = self._core.compile_model(self._source, "CPU", self._config)
        return self.built[None]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        compiled = self._compiled(x.shape[0])
        requests = self._local.__dict__.setdefault("requests", {})  # per thread: {compiled model: request}
        request = requests.get(id(compiled))
        if request is None:
            request = requests[id(compiled)] = compiled.create_infer_request()
        request.infer({0: x}, share_inputs=True)
        return request.get_output_tensor(0).data.copy()  # the request reuses its output buffer


RUNTIMES: Dict[str, Runtime] = {r.name: r for r in (OpenVino(), OnnxRuntime())}
# The runtimes backend="auto" chooses from on CPU tensors of each dtype, those installed that compute in that
# dtype here. With more than one, the engine measures them once per model, size and thread count and keeps the
# faster (fastmvit.cpu.pick): the faster depends on the CPU, the model and the versions (2-core Xeon with AMX,
# float32 256x256, ms per batch 1 ONNX Runtime / OpenVINO: S 36.8/27.6, v2-1.0 33.9/25.5; before OpenVINO's
# static builds and the export's rewrites, v2-1.0 was 37.6/40.1), and a fixed order tuned on one CPU loses on
# another. bfloat16: OpenVINO alone (ONNX Runtime's CPU provider has no bf16 convolutions). Other dtypes
# (float16, float64) run the torch path. FASTMVIT_CPU_ENGINE=<runtime> forces one runtime (nothing measured);
# "torch": no CPU engine.
AUTO_ORDER: Dict[torch.dtype, Tuple[str, ...]] = {torch.float32: ("onnxruntime", "openvino"),
                                                  torch.bfloat16: ("openvino",)}
ENV = "FASTMVIT_CPU_ENGINE"


@functools.lru_cache(maxsize=None)
def problem(name: str) -> str:
    return RUNTIMES[name].problem()


def auto_runtime(dtype: torch.dtype) -> Optional[str]:
    """The first runtime backend="auto" would use for CPU tensors of ``dtype``, or None (the torch path runs)."""
    runtimes = auto_runtimes(dtype)
    return runtimes[0] if runtimes else None


def auto_runtimes(dtype: torch.dtype) -> Tuple[str, ...]:
    """The runtimes backend="auto" chooses from for CPU tensors of ``dtype``: () (the torch path runs), one,
    or several, of which the CPU engine keeps the one it measures faster (``fastmvit.cpu.pick``).
    FASTMVIT_CPU_ENGINE=<runtime> forces that runtime alone (nothing measured)."""
    return _auto_runtimes(dtype, os.environ.get(ENV, "").strip() or "auto")  # set but empty: as unset


@functools.lru_cache(maxsize=None)  # so each warning below is given once per process
def _auto_runtimes(dtype: torch.dtype, choice: str) -> Tuple[str, ...]:
    if choice == "torch":
        return ()
    if choice != "auto" and choice not in RUNTIMES:
        raise OptionError(f"{ENV}={choice!r}: use 'auto', 'torch' or one of {tuple(RUNTIMES)} (unset or empty: "
                          f"'auto')")
    installed = [r for r in RUNTIMES if not problem(r)]
    if not installed:
        warnings.warn("fastmvit: no CPU runtime is installed (" + "; ".join(problem(r) for r in RUNTIMES)
                      + "): CPU tensors run the plain PyTorch modules, several times slower than the CPU "
                        f"engine (set {ENV}=torch to choose that and silence this)", RuntimeWarning, stacklevel=5)
        return ()
    if choice != "auto" and problem(choice):
        warnings.warn(f"{ENV}={choice}: {problem(choice)}; using the runtimes installed", RuntimeWarning,
                      stacklevel=5)
    # Empty when no runtime computes in this dtype here (bfloat16 without bf16 instructions, float16,
    # float64): the torch path then computes in that dtype, as asked.
    usable = tuple(r for r in AUTO_ORDER.get(dtype, ()) if r in installed and dtype in RUNTIMES[r].supported_dtypes())
    if choice != "auto" and choice in usable:
        return (choice,)  # forced: no measuring
    return usable


def _cpuinfo_field(name: str, cpuinfo: str = "/proc/cpuinfo") -> Optional[str]:
    """The first ``name : value`` line's value in /proc/cpuinfo ("" where absent), None where the file
    cannot be read (not Linux)."""
    try:
        with open(cpuinfo) as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith(name)), "")
    except OSError:
        return None


def cpu_bf16_flags(cpuinfo: str = "/proc/cpuinfo") -> Optional[Tuple[str, ...]]:
    """The CPU's bfloat16 instruction sets (AVX512-BF16, AMX-BF16) from /proc/cpuinfo, or None where it
    cannot be read (not Linux)."""
    flags = _cpuinfo_field("flags", cpuinfo)
    if flags is None:
        return None
    return tuple(sorted(f for f in set(flags.split()) if f in ("avx512_bf16", "amx_bf16")))


def cpu_count() -> int:
    """CPUs this process may run on (its affinity, not the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def cpu_name() -> str:
    """The CPU model (for reports, and so that a cache shared between machines does not carry one CPU's
    measured runtime choice to another)."""
    import platform

    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


def describe(runtimes: Tuple[str, ...]) -> str:
    if not runtimes:
        return "torch path"
    if len(runtimes) == 1:
        return f"CPU engine on {runtimes[0]}"
    return (f"CPU engine on {' or '.join(runtimes)}, the faster measured per model, size and thread count at "
            f"its first build (recorded in $FASTMVIT_CACHE/cpu/; a model's choice: model.cpu_engine_runtimes)")


def auto_summary() -> Dict[str, str]:
    """What backend="auto" runs on CPU tensors per dtype, for ``python -m fastmvit info``."""
    found = ", ".join(f"{r} {RUNTIMES[r].version()}" for r in RUNTIMES if not problem(r))
    flags = cpu_bf16_flags()
    out = {"runtimes installed": found or f"none ({INSTALL_HINT})",
           "threads": f"{torch.get_num_threads()} (torch.get_num_threads())",
           "bfloat16 on this CPU": ("unknown" if flags is None else
                                    f"yes ({', '.join(flags)})" if flags else "no (no AVX512-BF16 or AMX)")}
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        out[str(dtype).replace("torch.", "")] = describe(auto_runtimes(dtype))
    return out
