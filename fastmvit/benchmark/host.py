"""``python -m fastmvit bench host``: the host (Python) cost of one fused forward, on any machine.

Every Triton kernel's ``run`` (what ``kernel[grid](...)`` calls: Triton's JIT dispatch on a GPU, the
interpreter on a CPU) is replaced by a no-op that only counts, and the engine's forward is timed on CPU
tensors. What remains is fastmvit's own work per forward: op dispatch, argument checks, launch
configuration, output allocation. Triton's own dispatch inside ``run`` (argument binding, its cache
lookup, the driver call) is excluded: it needs a GPU to measure.

The kernels are imported for the interpreter (a CPU has nothing else), so the launchers resolve the
interpreter's block configurations; the rules that pick them cost the same host work as the GPU's.
Timings: best of ``rounds`` rounds of ``forwards`` forwards each, in CPU time of the calling thread
(``time.thread_time``: a shared machine's other processes inflate it far less than wall time, which is
shown beside it; say the load either way). ``--calls`` adds a load-independent figure: Python function
calls per forward (``call`` and ``c_call`` events of ``sys.setprofile``).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import os
import sys
import time
from typing import Dict, Iterator, List, Optional

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _describe(a):
    if isinstance(a, torch.Tensor):
        return ("tensor", tuple(a.shape), a.stride(), a.storage_offset(), a.dtype, a.device, a.data_ptr())
    return a


@contextlib.contextmanager
def stubbed_launches(log: Optional[list] = None) -> Iterator[Dict[str, int]]:
    """Replace ``run`` of every Triton kernel in ``fastmvit.kernels`` by a counter; yields the counts
    (kernel name -> launches), restored on exit. With ``log`` (a list), each launch is also appended as
    (kernel, arguments with tensors described by shape, strides, offset, dtype, device and data pointer,
    the keyword arguments: grid, constexprs)."""
    import importlib
    import pkgutil

    from triton.runtime.jit import KernelInterface

    import fastmvit.kernels as pkg

    counts: Dict[str, int] = {}
    patched = []
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name.startswith("_") or info.name == "check":
            continue
        mod = importlib.import_module(f"fastmvit.kernels.{info.name}")
        for name, obj in vars(mod).items():
            if isinstance(obj, KernelInterface) and "run" not in vars(obj) and obj not in [p for p, _ in patched]:
                key = f"{info.name}.{name}"

                def noop(*args, _key=key, **kwargs):
                    counts[_key] = counts.get(_key, 0) + 1
                    if log is not None:
                        log.append((_key, tuple(map(_describe, args)), kwargs))

                obj.run = noop
                patched.append((obj, key))
    try:
        yield counts
    finally:
        for obj, _ in patched:
            del obj.run


def _engine(name: str, dtype: torch.dtype):
    import fastmvit
    from fastmvit.engine import Engine
    from fastmvit.model.random import randomize_

    model = randomize_(fastmvit.load(name, pretrained=False, backend="torch"), seed=0)
    return Engine(model, torch.device("cpu"), dtype)


def _count_calls(fn) -> int:
    calls = 0

    def prof(frame, event, arg):
        nonlocal calls
        if event in ("call", "c_call"):
            calls += 1

    sys.setprofile(prof)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return calls


def measure(name: str, *, batch: int = 1, size: int = 256, dtype: torch.dtype = torch.float16,
            rounds: int = 5, forwards: int = 50, calls: bool = False) -> dict:
    """Host cost of the engine's forward for one variant with every kernel launch a no-op."""
    from fastmvit.engine.engine import prepare_kernels

    prepare_kernels(torch.device("cpu"))
    engine = _engine(name, dtype)
    x = torch.randn(batch, 3, size, size).to(dtype)
    with torch.inference_mode(), stubbed_launches() as counts:
        engine(x)  # first call: whatever is resolved once per signature
        counts.clear()
        engine(x)
        launches = sum(counts.values())
        cpu, wall = [], []
        gc.collect()
        gc.disable()
        try:
            for _ in range(rounds):
                c0, t0 = time.thread_time(), time.perf_counter()
                for _ in range(forwards):
                    engine(x)
                cpu.append((time.thread_time() - c0) / forwards)
                wall.append((time.perf_counter() - t0) / forwards)
        finally:
            gc.enable()
        n_calls = _count_calls(lambda: engine(x)) if calls else None
    best = min(cpu)
    return {"model": name, "batch": batch, "size": size, "dtype": str(dtype).replace("torch.", ""),
            "launches": launches, "us_per_forward": best * 1e6, "us_per_launch": best * 1e6 / max(launches, 1),
            "us_median_round": sorted(cpu)[len(cpu) // 2] * 1e6, "us_wall_best": min(wall) * 1e6,
            "python_calls": n_calls}


def format_rows(rows: List[dict]) -> str:
    head = f"{'model':<10} {'batch':>5} {'dtype':<9} {'launches':>8} {'us/forward':>11} {'us/launch':>10} " \
           f"{'median':>9} {'wall':>9} {'py calls':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['model']:<10} {r['batch']:>5} {r['dtype']:<9} {r['launches']:>8} "
                     f"{r['us_per_forward']:>11.0f} {r['us_per_launch']:>10.1f} {r['us_median_round']:>9.0f} "
                     f"{r['us_wall_best']:>9.0f} "
                     f"{r['python_calls'] if r['python_calls'] is not None else '-':>9}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    from ..variants import VARIANTS, get_variant

    p = argparse.ArgumentParser(prog="python -m fastmvit bench host", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="all", help="variants, comma-separated, or 'all' (default)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--dtype", default="float16", choices=sorted(DTYPES))
    p.add_argument("--rounds", type=int, default=5, help="timed rounds; the best counts (default 5)")
    p.add_argument("--forwards", type=int, default=50, help="forwards per round (default 50)")
    p.add_argument("--calls", action="store_true", help="also count Python function calls per forward")
    args = p.parse_args(argv)
    if "fastmvit.kernels._common" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("bench host runs the kernels' launchers on CPU tensors: start a fresh process")
    names = list(VARIANTS) if args.models == "all" else [get_variant(m).name for m in args.models.split(",")]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"host cost per forward, kernel launches stubbed; torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs, load average {load:.2f} at start", flush=True)
    rows = []
    for name in names:
        rows.append(measure(name, batch=args.batch, size=args.size, dtype=DTYPES[args.dtype], rounds=args.rounds,
                            forwards=args.forwards, calls=args.calls))
    print("us/forward, us/launch: best round, thread CPU time; median: median round; wall: best round, wall time")
    print(format_rows(rows))
    load_end = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"load average {load_end:.2f} at the end (a busy machine inflates every figure)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
