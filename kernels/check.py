"""Compile every kernel specialisation the engine launches for a GPU target, without a GPU, and report what
each costs there: registers, spills (stack) and shared memory per thread block.

    python -m fastmvit.kernels check [--arch 90 80] [--only NAME] [--json FILE]

Fails (exit 1) on a compile error or a register spill. The interpreter that runs the kernels on the CPU
enforces none of tl.dot's shape rules, power-of-two blocks or register limits; this does.
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
FAMILIES = ("gemm", "attention", "sepattn", "pool", "dwconv", "conv", "mv2_block")


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


def _resource_usage(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_cuobjdump(), "-res-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+)", out)
    if not m:
        raise RuntimeError(f"cannot parse cuobjdump output: {out!r}")
    return {"registers": int(m[1]), "stack": int(m[2]), "shared": int(m[3])}


def _compile_one(family: str, index: int, arch: int) -> Result:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cfg = _configs(family)[index]
    start = time.perf_counter()
    try:
        # At run time Triton specialises every pointer from torch's allocator as 16-byte aligned (and
        # integers divisible by 16 as such): compile the same specialisation, or the vector widths and
        # register counts reported here would not be the ones that run.
        attrs = {(i,): [["tt.divisibility", 16]] for i, (name, ty) in enumerate(cfg.signature.items())
                 if ty.startswith("*")}
        attrs.update(cfg.attrs)
        src = ASTSource(fn=cfg.fn, signature=cfg.signature, constexprs=cfg.constexprs, attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
        usage = _resource_usage(compiled.asm["cubin"])
        # Triton reports its own shared-memory need (static smem is 0 in the cubin for dynamic allocation).
        usage["shared"] = max(usage["shared"], int(getattr(compiled.metadata, "shared", 0) or 0))
        return Result(family, cfg.name, arch, usage["stack"] == 0, **usage,
                      error="" if usage["stack"] == 0 else "register spill",
                      seconds=time.perf_counter() - start)
    except Exception as e:  # report every failure, keep compiling the rest
        return Result(family, cfg.name, arch, False, error=f"{type(e).__name__}: {str(e)[:300]}",
                      seconds=time.perf_counter() - start)


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
    print(format_results(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in results], f, indent=1)
    if not results:
        print("no kernel specialisations found", file=sys.stderr)
        return 1
    return 0 if all(r.ok for r in results) else 1
