"""backend="auto" on the CPU with more than one runtime for a dtype: which is faster depends on the CPU, the
model and the runtimes' versions (2-core Xeon with AMX, float32 256x256, ms per batch 1 ONNX Runtime /
OpenVINO: S 36.8 / 27.6, v2-1.0 33.9 / 25.5 by this probe at load 0.7-1.9; before OpenVINO's static builds and
the export's rewrites, v2-1.0 was 37.6 / 40.1), so the engine measures, once per (graph, dtype, threads), and
records the choice beside the exported graph in ``$FASTMVIT_CACHE/cpu/`` so that the next process builds it
alone.

The measurement is bounded: both runtimes are built from the same ONNX file, then WARMUP + RUNS batch-1
runs of each, interleaved (each round alternates which runs first), the median of RUNS kept per runtime.
Batch 1 because the build happens at the first call, whose batch may be large (S at batch 256: seconds per
run): batch 1 bounds the cost at one extra build plus 2 x (WARMUP + RUNS) latency-sized runs.

A measurement settles the choice when the machine was quiet (1-minute load average below BUSY_LOAD_PER_CPU per
CPU, at least 1) and the faster runtime won by at least MIN_MARGIN. Otherwise the record is provisional: this
engine uses it, and the next engines built for this graph (a new model, the next process) measure again (each
one more build and a second), accumulating, until a measurement settles it or MAX_MEASUREMENTS were made. The
load average counts this process's own recent work too: a busy process (the benchmark itself) can make its own
measurements provisional, which costs at most those extra measurements. The choice of an unsettled record is
the runtime with the lowest geometric mean, over the measurements, of its median over the fastest one's (a
busy measurement, slower throughout, weighs no more than a quiet one). Measured: S at load 2.8-4.5 picked ONNX
Runtime by 1-3 ms, OpenVINO being 4 ms faster when quiet."""
from __future__ import annotations

import json
import os
import statistics
import threading
import time
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch

from .runtimes import RUNTIMES, Compiled, cpu_count, cpu_name

WARMUP = 2
RUNS = 5
PROBE_BATCH = 1


def probe(height: int, width: int) -> np.ndarray:
    """The one input every candidate is timed on: fixed, image-like values (timing does not depend on them)."""
    return np.random.default_rng(0).standard_normal((PROBE_BATCH, 3, height, width), dtype=np.float32)


def time_runtimes(compiled: Dict[str, Compiled], x: np.ndarray) -> Dict[str, float]:
    """Median milliseconds per run of each compiled graph on ``x``: WARMUP rounds, then RUNS rounds in
    which every candidate runs once, the order alternating round by round (so that neither always runs
    right after the other's cache traffic)."""
    names = list(compiled)
    for _ in range(WARMUP):
        for name in names:
            compiled[name](x)
    times: Dict[str, list] = {name: [] for name in names}
    for i in range(RUNS):
        for name in (names if i % 2 == 0 else names[::-1]):
            start = time.perf_counter()
            compiled[name](x)
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def record_path(onnx_path: str, dtype: torch.dtype, threads: int) -> Path:
    """Beside the graph it measured (whose name holds the weights, numerics and size)."""
    path = Path(onnx_path)
    return path.with_name(f"{path.stem}.{str(dtype).replace('torch.', '')}.t{threads}.pick.json")


# When a measurement settles the choice (module docstring).
BUSY_LOAD_PER_CPU = 0.5
MIN_MARGIN = 0.05
MAX_MEASUREMENTS = 3


def machine_load() -> Optional[float]:
    """The 1-minute load average (None where the OS has none)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def _versions(candidates) -> Dict[str, str]:
    return {name: RUNTIMES[name].version() for name in candidates}


def read_record(path: Path, candidates) -> Optional[dict]:
    """The record, if it was measured among these candidates, at these versions, on this CPU model."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if (not isinstance(record, dict) or record.get("candidates") != list(candidates)
            or record.get("versions") != _versions(candidates) or record.get("cpu") != cpu_name()
            or record.get("runtime") not in candidates or not isinstance(record.get("measurements"), list)):
        return None
    return record


def settled_choice(record: Optional[dict]) -> Optional[str]:
    """The recorded runtime when no more measuring is due, else None (measure, then ``record_measurement``)."""
    return record["runtime"] if record is not None and record.get("settled") is True else None


def decisive(median_ms: Dict[str, float], load: Optional[float]) -> bool:
    """Whether this measurement settles the choice: a quiet machine and a clear winner."""
    quiet = load is not None and load < max(1.0, BUSY_LOAD_PER_CPU * cpu_count())
    first, second = sorted(median_ms.values())[:2]
    return quiet and second >= first * (1 + MIN_MARGIN)


def record_measurement(path: Path, record: Optional[dict], candidates, median_ms: Dict[str, float],
                       load: Optional[float]) -> str:
    """Add this measurement to the (provisional or absent) record, write it, return the runtime chosen."""
    measurements = (record or {}).get("measurements", []) + [
        {"median_ms_batch1": {k: round(v, 3) for k, v in median_ms.items()},
         "load_average": None if load is None else round(load, 2)}]
    if decisive(median_ms, load):
        runtime, settled = min(median_ms, key=median_ms.get), True
    else:
        def relative(name):  # geometric mean of this runtime's median over each measurement's fastest
            ratios = [m["median_ms_batch1"][name] / max(min(m["median_ms_batch1"].values()), 1e-9)
                      for m in measurements]
            return statistics.geometric_mean(ratios)

        runtime, settled = min(candidates, key=relative), len(measurements) >= MAX_MEASUREMENTS
    new = {"runtime": runtime, "settled": settled, "candidates": list(candidates),
           "versions": _versions(candidates), "cpu": cpu_name(), "measurements": measurements,
           "probe": f"batch {PROBE_BATCH}, {WARMUP} warm-up + median of {RUNS} interleaved runs"}
    tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        tmp.write_text(json.dumps(new, indent=1))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache: the next process measures again, nothing worse
    return runtime
