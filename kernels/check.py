"""Compile every kernel specialisation the engine launches for a GPU target, without a GPU, and report what
each costs there: registers, spills (stack) and shared memory per thread block.

    python -m fastmvit.kernels check [--arch 90 80] [--only NAME] [--json FILE]

Fails (exit 1) on a compile error or a register spill. The interpreter that runs the kernels on the CPU
enforces none of tl.dot's shape rules, power-of-two blocks or register limits; this does. Where nvcc is
installed, the CUDA C++ kernels of csrc/ are compiled and reported too.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
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
            "num_warps": cfg.num_warps, "wgmma": ptx.count("wgmma.mma_async"), "v4": ptx.count("global.v4")}


def _compile_one(family: str, index: int, arch: int) -> Result:
    cfg = _configs(family)[index]
    start = time.perf_counter()
    try:
        usage = resource_usage(cfg, arch)
    except Exception as e:  # report every failure, keep compiling the rest
        return Result(family, cfg.name, arch, False, error=f"{type(e).__name__}: {str(e)[:300]}",
                      seconds=time.perf_counter() - start)
    spills = usage["stack"] > 0
    return Result(family, cfg.name, arch, not spills, usage["registers"], usage["stack"], usage["shared"],
                  error="register spill" if spills else "", seconds=time.perf_counter() - start)


_CACHE: dict = {}


def _configs(family: str):
    if family not in _CACHE:
        module = importlib.import_module(f"fastmvit.kernels.{family}")
        _CACHE[family] = list(module.compile_configs())
    return _CACHE[family]


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


def run_checks(archs=(90, 80), only: Optional[str] = None, jobs: Optional[int] = None) -> List[Result]:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: the compile check needs the real compiler")
    tasks = [(family, i, arch) for family in available_families() if not only or only in family
             for i, cfg in enumerate(_configs(family)) if not only or only in family or only in cfg.name
             for arch in archs]
    with ProcessPoolExecutor(max_workers=jobs or os.cpu_count()) as pool:
        return list(pool.map(_compile_one, *zip(*tasks))) if tasks else []


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
    parser.add_argument("--only", help="only kernels whose family or name contains this")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--jobs", type=int, help="parallel compiles (default: CPU count)")
    args = parser.parse_args(argv)
    results = run_checks(tuple(args.arch), args.only, args.jobs)
    if not args.only or args.only in "csrc":
        results += check_csrc(tuple(args.arch))
    print(format_results(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in results], f, indent=1)
    if not results:
        print("no kernel specialisations found", file=sys.stderr)
        return 1
    return 0 if all(r.ok for r in results) else 1
