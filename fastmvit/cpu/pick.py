"""backend="auto" on the CPU with more than one runtime for a dtype: which is faster depends on the CPU and the
model (2-core Xeon with AMX, float32 256x256, ms per batch 1 ONNX Runtime / OpenVINO: S 48.3 / 44.4, v2-1.0
37.6 / 40.1), so the engine measures, once per (graph, dtype, threads), and records the choice beside the
exported graph in ``$FASTMVIT_CACHE/cpu/`` so that the next process builds the recorded runtime alone.

The measurement is bounded: both runtimes are built from the same ONNX file, then WARMUP + RUNS batch-1
runs of each, interleaved (each round alternates which runs first), the median of RUNS kept per runtime.
Batch 1 because the build happens at the first call, whose batch may be large (S at batch 256: seconds per
run): batch 1 bounds the cost at one extra build plus 2 x (WARMUP + RUNS) latency-sized runs."""
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

from .runtimes import RUNTIMES, Compiled, cpu_name

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


def _versions(candidates) -> Dict[str, str]:
    return {name: RUNTIMES[name].version() for name in candidates}


def read_choice(path: Path, candidates) -> Optional[str]:
    """The recorded runtime, if the record was measured among these candidates, at these versions, on this
    CPU model."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if (not isinstance(record, dict) or record.get("candidates") != list(candidates)
            or record.get("versions") != _versions(candidates) or record.get("cpu") != cpu_name()
            or record.get("runtime") not in candidates):
        return None
    return record["runtime"]


def write_choice(path: Path, candidates, runtime: str, median_ms: Dict[str, float]) -> None:
    record = {"runtime": runtime, "candidates": list(candidates), "versions": _versions(candidates), "cpu": cpu_name(),
              "median_ms_batch1": {k: round(v, 3) for k, v in median_ms.items()},
              "probe": f"batch {PROBE_BATCH}, {WARMUP} warm-up + median of {RUNS} interleaved runs"}
    tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache: the next process measures again, nothing worse
