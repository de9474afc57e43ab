"""The device's peak memory bandwidth and FLOP/s: measured where possible (a large copy and a large
GEMM), the datasheet's numbers otherwise, each labelled with where it came from."""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, Optional, Tuple

import torch

from .harness import time_call

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# Dense (no sparsity) datasheet figures: HBM/GDDR bandwidth in GB/s, tensor-core float16/bfloat16 with
# float32 accumulation and plain (non-TF32) float32 in TFLOP/s. Matched by substring of the device name,
# first match wins, so the more specific names come first.
DATASHEET = (
    ("H100 NVL", {"bandwidth_GBps": 3900, "tflops": {"float16": 835, "bfloat16": 835, "float32": 60}}),
    ("H100 PCIe", {"bandwidth_GBps": 2000, "tflops": {"float16": 756, "bfloat16": 756, "float32": 51}}),
    ("H100", {"bandwidth_GBps": 3350, "tflops": {"float16": 989, "bfloat16": 989, "float32": 67}}),
    ("H200", {"bandwidth_GBps": 4800, "tflops": {"float16": 989, "bfloat16": 989, "float32": 67}}),
    ("A100-SXM4-80GB", {"bandwidth_GBps": 2039, "tflops": {"float16": 312, "bfloat16": 312, "float32": 19.5}}),
    ("A100", {"bandwidth_GBps": 1555, "tflops": {"float16": 312, "bfloat16": 312, "float32": 19.5}}),
    ("L40S", {"bandwidth_GBps": 864, "tflops": {"float16": 362, "bfloat16": 362, "float32": 91.6}}),
    ("A10", {"bandwidth_GBps": 600, "tflops": {"float16": 125, "bfloat16": 125, "float32": 31.2}}),
    ("L4", {"bandwidth_GBps": 300, "tflops": {"float16": 121, "bfloat16": 121, "float32": 30.3}}),
    ("RTX 4090", {"bandwidth_GBps": 1008, "tflops": {"float16": 165, "bfloat16": 165, "float32": 82.6}}),
)


def datasheet(name: str) -> Optional[dict]:
    """The datasheet peaks of a device by name, or None if it is not in the table."""
    for key, peak in DATASHEET:
        if key.lower() in name.lower():
            return {"bandwidth_GBps": peak["bandwidth_GBps"], "tflops": dict(peak["tflops"]),
                    "source": {"bandwidth_GBps": f"datasheet ({key})",
                               **{f"tflops.{d}": f"datasheet ({key})" for d in peak["tflops"]}}}
    return None


def _best_seconds(fn: Callable[[], object], device: torch.device, repeats: int) -> Tuple[float, Optional[float]]:
    """Best of ``repeats`` timed calls after two untimed ones (a peak is the best the device does), and
    the worst of them over the best: how much the repeats varied (None with ``do_bench``). On an idle
    machine the repeats agree; a wide spread means other work was competing for the device."""
    if device.type == "cuda":
        try:
            from triton.testing import do_bench

            return do_bench(fn, warmup=25, rep=100, return_mode="min") / 1e3, None
        except ImportError:
            pass
    fn()
    fn()
    times = [time_call(fn, device) for _ in range(repeats)]
    return min(times), max(times) / min(times)


@contextlib.contextmanager
def _strict_fp32():
    """Plain float32 GEMMs (no TF32), the throughput a float32 model gets without opting in."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def measure(device: torch.device, dtypes=("float32", "float16", "bfloat16")) -> dict:
    """Measure the copy bandwidth and GEMM throughput of ``device``.

    CUDA: copy between two 1 GiB buffers (20x the L2 of an H100), GEMMs of 8192^3. CPU: 256 MiB copy
    and 1024^3 GEMMs, in seconds. A measurement that fails is left out."""
    on_gpu = device.type == "cuda"
    peak: dict = {"tflops": {}, "source": {}, "spread": {}}
    nbytes = (1 << 30) if on_gpu else (256 << 20)
    try:
        src = torch.full((nbytes // 4,), 1.5, device=device)
        dst = torch.empty_like(src)
        t, spread = _best_seconds(lambda: dst.copy_(src), device, repeats=5)
        peak["bandwidth_GBps"] = 2 * nbytes / t / 1e9
        if spread is not None:
            peak["spread"]["bandwidth_GBps"] = spread
        peak["source"]["bandwidth_GBps"] = f"measured (copy of {nbytes >> 20} MiB)"
        del src, dst
    except Exception as e:  # out of memory, say: fall back to the datasheet
        peak["source"]["bandwidth_GBps"] = f"measurement failed: {type(e).__name__}"
    for name in dtypes:
        n = 8192 if on_gpu else 1024
        try:
            a = torch.randn(n, n, device=device, dtype=DTYPES[name])
            b = torch.randn(n, n, device=device, dtype=DTYPES[name])
            with _strict_fp32():
                t, spread = _best_seconds(lambda: torch.mm(a, b), device, repeats=5)
            peak["tflops"][name] = 2 * n ** 3 / t / 1e12
            if spread is not None:
                peak["spread"][f"tflops.{name}"] = spread
            peak["source"][f"tflops.{name}"] = f"measured (GEMM {n}^3)"
            del a, b
        except Exception as e:
            peak["source"][f"tflops.{name}"] = f"measurement failed: {type(e).__name__}"
    if on_gpu:
        torch.cuda.empty_cache()
    return peak


def device_peak(device: torch.device, name: str, measure_peak: bool = True,
                dtypes=("float32", "float16", "bfloat16")) -> dict:
    """Measured peaks where possible, datasheet values filling the gaps (each labelled in ``source``)."""
    peak = measure(device, dtypes) if measure_peak else {"tflops": {}, "source": {}}
    sheet = datasheet(name) if device.type == "cuda" else None
    if sheet:
        if "bandwidth_GBps" not in peak:
            peak["bandwidth_GBps"] = sheet["bandwidth_GBps"]
            peak["source"]["bandwidth_GBps"] = sheet["source"]["bandwidth_GBps"]
        for d, v in sheet["tflops"].items():
            if d not in peak["tflops"]:
                peak["tflops"][d] = v
                peak["source"][f"tflops.{d}"] = sheet["source"][f"tflops.{d}"]
        peak["datasheet"] = {"bandwidth_GBps": sheet["bandwidth_GBps"], "tflops": sheet["tflops"]}
    return peak


def format_peak(peak: Dict) -> str:
    parts = []
    if peak.get("bandwidth_GBps"):
        parts.append(f"{peak['bandwidth_GBps']:.0f} GB/s ({peak['source'].get('bandwidth_GBps', '?')})")
    for d, v in sorted((peak.get("tflops") or {}).items()):
        parts.append(f"{d} {v:.3g} TFLOP/s ({peak['source'].get(f'tflops.{d}', '?')})")
    return "; ".join(parts) or "unknown"
