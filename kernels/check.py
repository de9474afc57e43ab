"""Compile every kernel specialisation the engine launches for a GPU target, without a GPU, and report what
each costs there: registers, spills (stack) and shared memory per thread block.

    python -m fastmvit.kernels check [--arch 90 80] [--family F ...] [--dtype fp16 ...] [--only TEXT ...]
                                     [--json FILE] [--jobs N] [--quiet]

Fails (exit 1) on a compile error, a register spill, or registers over a family's cap (a kernel module's
``max_registers(cfg, arch)``). Each family's configurations are those its launch rules pick for the
arch checked (``compile_configs(arch=...)`` where a module's rules depend on it). A progress line per
compile goes to stderr (``--quiet``: none). The interpreter that runs the kernels on the CPU
enforces none of tl.dot's shape rules, power-of-two blocks or register limits; this does. Where nvcc is
installed, the CUDA C++ kernels of csrc/ are compiled and reported too.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from typing import List, Optional

# Kernel families, each a module of this package with compile_configs().
FAMILIES = ("gemm", "attention", "sepattn", "pool", "dwconv", "conv", "mv2_block", "aspp", "labels")


@dataclass
class Result:
    family: str
    name: str
    arch: int
    ok: bool
    registers: Optional[int] = None
    stack: Optional[int] = None       # bytes of local memory per thread: > 0 means spills
    shared: Optional[int] = None      # bytes of shared memory per block
    error: str = ""
    seconds: float = 0.0


def _cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def compile_config(cfg, arch: int = 90):
    """Compile one specialisation ahead of time for ``sm_<arch>`` (no GPU needed): Triton's CompiledKernel.
    At run time Triton specialises pointers from torch's allocator (and integers divisible by 16) as
    16-divisible; ``cfg.specialisation()`` compiles the same specialisation, so vector widths and register
    counts here are those of the kernel that runs."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if not isinstance(cfg.fn, triton.runtime.JITFunction):
        raise RuntimeError(f"{cfg.name}: the kernels are interpreted here (TRITON_INTERPRET=1); compiling "
                           f"needs a process with the interpreter off")
    src = ASTSource(fn=cfg.fn, signature=cfg.signature, constexprs=cfg.constexprs, attrs=cfg.specialisation())
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})


def resource_usage(cfg, arch: int = 90) -> dict:
    """Compile ``cfg`` and read what the GPU spends on it: registers, stack bytes (spills), shared memory
    (Triton's own figure: it allocates dynamically), wgmma instructions and 16-byte global accesses."""
    compiled = compile_config(cfg, arch)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([_cuobjdump(), "-res-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+)", out)
    if not m:
        raise RuntimeError(f"cannot parse cuobjdump output: {out!r}")
    ptx = compiled.asm["ptx"]
    return {"name": cfg.name, "registers": int(m[1]), "stack": int(m[2]),
            "shared": max(int(m[3]), int(getattr(compiled.metadata, "shared", 0) or 0)),
            "num_warps": cfg.num_warps, "wgmma": ptx.count("wgmma.mma_async"), "v4": ptx.count("global.v4"),
            "ld_v4": ptx.count("ld.global.v4"), "st_v4": ptx.count("st.global.v4")}


def _compile_one(family: str, index: int, arch: int) -> Result:
    cfg = _configs(family, arch)[index]
    start = time.perf_counter()
    try:
        usage = resource_usage(cfg, arch)
    except Exception as e:  # report every failure, keep compiling the rest
        return Result(family, cfg.name, arch, False, error=f"{type(e).__name__}: {str(e)[:300]}",
                      seconds=time.perf_counter() - start)
    cap_of = getattr(importlib.import_module(f"fastmvit.kernels.{family}"), "max_registers", None)
    cap = cap_of(cfg, arch) if cap_of else None
    error = ("register spill" if usage["stack"] > 0
             else f"{usage['registers']} registers > cap {cap}" if cap is not None and usage["registers"] > cap
             else "")
    return Result(family, cfg.name, arch, not error, usage["registers"], usage["stack"], usage["shared"],
                  error=error, seconds=time.perf_counter() - start)


_CACHE: dict = {}


def _configs(family: str, arch: int = 90):
    """The family's specialisations under the launch rules for sm_<arch> (one list for every arch when
    its ``compile_configs`` takes no ``arch``)."""
    module = importlib.import_module(f"fastmvit.kernels.{family}")
    per_arch = "arch" in inspect.signature(module.compile_configs).parameters
    key = (family, arch if per_arch else None)
    if key not in _CACHE:
        _CACHE[key] = list(module.compile_configs(arch=arch) if per_arch else module.compile_configs())
    return _CACHE[key]


def _matches_dtype(name: str, dtypes) -> bool:
    """A configuration's name carries its activation dtype as a dash-separated word (``-fp16-``, ``-bf16``)."""
    return not dtypes or any(re.search(rf"(^|-){d}(-|$)", name) for d in dtypes)


def available_families() -> List[str]:
    found = []
    for family in FAMILIES:
        try:
            module = importlib.import_module(f"fastmvit.kernels.{family}")
        except ModuleNotFoundError:
            continue
        if hasattr(module, "compile_configs"):
            found.append(family)
    return found


def select(archs=(90, 80), only=None, families=None, dtypes=None):
    """(family, config index, arch) of every compile to run: families (default all), dtypes (fp16, bf16,
    fp32: matched against the names), only (substrings, any of which the family or name contains)."""
    only = [only] if isinstance(only, str) else list(only or [])
    unknown = set(families or ()) - set(available_families()) - {"csrc"}  # csrc: check_csrc's
    if unknown:
        raise SystemExit(f"unknown kernel families {sorted(unknown)}; known: {', '.join(available_families())}, csrc")
    tasks = []
    for family in available_families():
        if families and family not in families:
            continue
        for arch in archs:
            for i, cfg in enumerate(_configs(family, arch)):
                if only and not any(o in family or o in cfg.name for o in only):
                    continue
                if _matches_dtype(cfg.name, dtypes):
                    tasks.append((family, i, arch))
    return tasks


def run_checks(archs=(90, 80), only=None, jobs: Optional[int] = None, families=None, dtypes=None,
               progress=None) -> List[Result]:
    """Compile the selected specialisations in parallel; ``progress(line)`` is called as each finishes."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: the compile check needs the real compiler")
    tasks = select(archs, only, families, dtypes)
    if not tasks:
        return []
    results: List[Optional[Result]] = [None] * len(tasks)
    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=jobs or os.cpu_count()) as pool:
        futures = {pool.submit(_compile_one, *t): k for k, t in enumerate(tasks)}
        for done, future in enumerate(as_completed(futures), 1):
            r = results[futures[future]] = future.result()
            if progress:
                progress(f"[{done}/{len(tasks)} {time.perf_counter() - start:6.0f} s] {r.family}/{r.name} "
                         f"sm_{r.arch}: {r.registers} regs, stack {r.stack}, {r.seconds:.1f} s"
                         f"{'' if r.ok else ' -- ' + r.error}")
    return results


def check_csrc(archs=(90, 80)) -> List[Result]:
    """The CUDA C++ kernels of csrc/ compiled with the system nvcc (no torch needed): their registers and
    spills beside the Triton ones. Nothing when nvcc or the sources are absent (an installed wheel)."""
    from fastmvit.ops import cuda_ext

    if not cuda_ext.nvcc_path():
        return []
    results = []
    for arch in archs:
        start = time.perf_counter()
        try:
            kernels = cuda_ext.nvcc_check(arch=f"sm_{arch}")
        except FileNotFoundError:
            return []
        except RuntimeError as e:
            results.append(Result("csrc", "dwconv.cu", arch, False, error=str(e)[:300]))
            continue
        seconds = (time.perf_counter() - start) / len(kernels)
        results += [Result("csrc", k.name, arch, not k.spills, k.registers, k.stack_bytes, k.shared_bytes,
                           error="register spill" if k.spills else "", seconds=seconds) for k in kernels]
    return results


def format_results(results: List[Result]) -> str:
    lines = [f"{'kernel':<58} {'sm':>3} {'regs':>5} {'spill':>6} {'smem':>7}  status"]
    for r in results:
        lines.append(f"{r.family + '/' + r.name:<58} {r.arch:>3} {r.registers if r.registers is not None else '-':>5} "
                     f"{r.stack if r.stack is not None else '-':>6} {r.shared if r.shared is not None else '-':>7}  "
                     f"{'ok' if r.ok else r.error}")
    bad = [r for r in results if not r.ok]
    lines.append(f"{len(results)} compiled, {len(bad)} failed")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastmvit.kernels check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80], help="SM versions (default 90 80)")
    parser.add_argument("--family", nargs="+", help="only these kernel families (default: all), e.g. gemm conv")
    parser.add_argument("--dtype", nargs="+", choices=("fp16", "bf16", "fp32"), help="only these dtypes")
    parser.add_argument("--only", nargs="+", help="only kernels whose family or name contains one of these")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--jobs", type=int, help="parallel compiles (default: CPU count)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = parser.parse_args(argv)
    progress = None if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    results = run_checks(tuple(args.arch), args.only, args.jobs, args.family, args.dtype, progress)
    if (not args.family or "csrc" in args.family) and (not args.only or any(o in "csrc" for o in args.only)):
        results += check_csrc(tuple(args.arch))
    print(format_results(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in results], f, indent=1)
    if not results:
        print("no kernel specialisations found", file=sys.stderr)
        return 1
    return 0 if all(r.ok for r in results) else 1
