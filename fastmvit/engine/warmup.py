"""Cold start: compile every Triton kernel specialisation a model's engine will launch, in parallel over all
cores, before the first forward.

Triton compiles a kernel the first time it is launched with a new specialisation (constexprs, dtypes,
16-byte alignment of pointers and integers, launch options): about 2.7 s each on a 2-core machine, and a
model at a few batch sizes launches some tens of them one after the other. ``warmup`` first runs the
engine's forward with every launch recorded instead of run (``record_launches``: only Python and a few
torch ops on uninitialised buffers), merges the launches that share a specialisation, then compiles the
distinct ones in worker processes:

- on a GPU, with Triton's own ``JITFunction.warmup`` for the recorded arguments: exactly what the first
  launch would compile, into Triton's on-disk cache (TRITON_CACHE_DIR, default ~/.triton/cache), where
  the serving process's first forward finds it;
- without one (``target="sm_90"``), ahead of time for that target, as ``python -m fastmvit.kernels check``
  does: the same work on the CPU, to time it and to check the set compiles; nothing is cached for a GPU.

    python -m fastmvit warmup --model s --dtype float16 --batch 1,8,64,256 [--size 256] [--jobs N]

Requires every kernel launch to go through ``JITFunction.run`` (``kernel[grid](...)``) on first use.
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

__all__ = ["Launch", "WarmupReport", "record_launches", "compile_launches", "warmup", "main"]

_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int32: "i32",
           torch.int64: "i64", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1"}
_TORCH_DTYPE = {name: dt for dt, name in _DTYPES.items()}
_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg", "enable_fp_fusion", "launch_cooperative_grid")


@dataclass(frozen=True)
class Launch:
    """One kernel specialisation: the kernel's module and name, and its arguments reduced to what Triton
    specialises on. A tensor is ``("tensor", dtype name, 16-byte aligned)``; a non-constexpr integer
    ``("int", value == 1, value % 16 == 0, fits in int32)``; constexprs and options keep their values."""

    module: str
    name: str
    args: Tuple[Tuple[str, object], ...]      # (parameter name, reduced value) in parameter order
    options: Tuple[Tuple[str, object], ...]

    def describe(self) -> str:
        consts = ", ".join(f"{k}={v}" for k, v in self.args if not isinstance(v, tuple))
        return f"{self.module.rsplit('.', 1)[-1]}.{self.name}({consts}) {dict(self.options)}"


@dataclass
class WarmupReport:
    launches: int                 # kernel launches recorded over all batch sizes
    specialisations: List[Launch]
    mode: str                     # "cuda" (into Triton's cache) or "sm_XX" (ahead of time, no GPU)
    jobs: int
    record_s: float
    compile_s: float
    failures: List[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"{len(self.specialisations)} kernel specialisations ({self.launches} launches recorded) compiled "
                f"for {self.mode} with {self.jobs} process(es) in {self.compile_s:.1f} s "
                f"(recording {self.record_s:.1f} s); {len(self.failures)} failed")


# -- recording --------------------------------------------------------------------------------------

def _reduce(value, constexpr: bool):
    if isinstance(value, torch.Tensor):
        return ("tensor", _DTYPES[value.dtype], value.data_ptr() % 16 == 0)
    if constexpr or isinstance(value, bool) or value is None:
        return value
    if isinstance(value, float):  # Triton passes every float as fp32, whatever its value
        return ("float",)
    if isinstance(value, int):
        return ("int", value == 1, value % 16 == 0, -2 ** 31 <= value < 2 ** 31)
    return value


def unspecialised(kernel) -> tuple:
    """The kernel's ``do_not_specialize`` arguments (names or indices), compiled or interpreted."""
    dns = getattr(kernel, "do_not_specialize", None)
    if dns is None:  # an InterpretedFunction keeps the decorator's arguments
        dns = getattr(kernel, "kwargs", {}).get("do_not_specialize")
    return tuple(dns or ())


def _launch_of(kernel, args, kwargs) -> Launch:
    fn = kernel.fn  # the Python function under @triton.jit (JITFunction and InterpretedFunction alike)
    params = inspect.signature(fn).parameters
    bound = inspect.signature(fn).bind_partial(*args, **{k: v for k, v in kwargs.items() if k in params})
    bound.apply_defaults()
    # do_not_specialize: Triton neither makes such an integer a constexpr when it is 1 nor specialises
    # on its 16-divisibility (the depthwise conv's dilation), so every value shares one specialisation
    plain = {p if isinstance(p, str) else list(params)[p] for p in unspecialised(kernel)}
    reduced = tuple((name, ("int", False, False, True) if name in plain and isinstance(value, int)
                     and not isinstance(value, bool) else _reduce(value, "constexpr" in str(params[name].annotation)))
                    for name, value in bound.arguments.items())
    options = tuple(sorted((k, v) for k, v in kwargs.items() if k not in params))
    return Launch(fn.__module__, fn.__name__, reduced, options)


@contextlib.contextmanager
def _recording(launches: List[Launch]):
    """Every Triton launch is recorded instead of run (compiled kernels and interpreted ones alike)."""
    from triton.runtime.jit import JITFunction

    classes = [JITFunction]
    try:
        from triton.runtime.interpreter import InterpretedFunction
        classes.append(InterpretedFunction)
    except ImportError:
        pass

    def run(self, *args, grid, warmup, **kwargs):
        launches.append(_launch_of(self, args, kwargs))
        return None

    saved = [(c, c.__dict__["run"]) for c in classes if "run" in c.__dict__]
    for c, _ in saved:
        c.run = run
    try:
        yield
    finally:
        for c, original in saved:
            c.run = original


def _engine_fn(model, x: torch.Tensor):
    """The model's fused forward without CUDA graphs. On a CPU with the interpreter off this builds the
    steps directly (the launchers then pick their GPU configurations, for a 132-SM device)."""
    if x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1":
        return model._engines.engine(model, x)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    from .plan import build_steps
    from .replay import direct

    with torch.no_grad():
        steps = build_steps(model, x.device, x.dtype)

    def forward(x):
        for step in steps:
            x = step(x, direct)
        return x

    return forward


def record_launches(model, batches: Iterable[int] = (1,), sizes: Iterable[Tuple[int, int]] = ((256, 256),)
                    ) -> List[Launch]:
    """Every kernel launch of ``model``'s fused forward (on its device, in its dtype) at each batch and
    image size, in order (not merged), without running a kernel; for a segmentation model, then the
    label map's (``DeepLabV3.labels``)."""
    p = next(model.parameters())
    launches: List[Launch] = []
    fn = None
    with _recording(launches), torch.inference_mode():
        for h, w in sizes:
            for b in batches:
                x = torch.zeros(b, 3, h, w, device=p.device, dtype=p.dtype)
                fn = fn or _engine_fn(model, x)
                out = fn(x)
                if getattr(model, "task", None) == "segmentation":  # DeepLabV3.labels' upsample + argmax
                    from ..ops.labels import bilinear_argmax

                    bilinear_argmax(out, (h, w), model.upsample_align_corners)
    if not launches:
        raise RuntimeError("no Triton launch was recorded: the engine's launch path no longer goes through "
                           "JITFunction.run, which the warm-up relies on")
    return launches


def distinct(launches: Sequence[Launch]) -> List[Launch]:
    return list(dict.fromkeys(launches))


# -- compiling --------------------------------------------------------------------------------------

def _worker_init(interpret_off: bool) -> None:
    if interpret_off:
        os.environ["TRITON_INTERPRET"] = "0"
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")


def _kernel(launch: Launch):
    return getattr(importlib.import_module(launch.module), launch.name)


def _int_for(value) -> int:
    """An integer that Triton specialises like the recorded one."""
    _, is_one, aligned, i32 = value
    if is_one:
        return 1
    base = 16 if aligned else 17
    return base if i32 else 2 ** 32 + base


def _compile_on_gpu(launch: Launch, device_index: int) -> Tuple[str, float, str]:
    """Triton's own warm-up for the recorded arguments: the same cache entry the first launch would make."""
    start = time.perf_counter()
    try:
        torch.cuda.set_device(device_index)
        kernel = _kernel(launch)
        args = []
        for _, value in launch.args:
            if isinstance(value, tuple) and value[0] == "tensor":
                dt = _TORCH_DTYPE[value[1]]
                # aligned: Triton's MockTensor (data pointer 0); else a real view one element off
                args.append(dt if value[2] else torch.empty(2, dtype=dt, device="cuda")[1:])
            elif isinstance(value, tuple) and value[0] == "int":
                args.append(_int_for(value))
            elif value == ("float",):
                args.append(1.5)
            else:
                args.append(value)
        compiled = kernel.warmup(*args, grid=(1,), **dict(launch.options))
        # Loading it also builds the launcher, which some Triton versions compile (and cache) per signature
        getattr(compiled, "_init_handles", lambda: None)()
        return launch.describe(), time.perf_counter() - start, ""
    except Exception as e:  # report, keep compiling the rest
        return launch.describe(), time.perf_counter() - start, f"{type(e).__name__}: {str(e)[:300]}"


def _compile_ahead(launch: Launch, arch: int) -> Tuple[str, float, str]:
    """Ahead of time for sm_<arch> without a GPU, through ``python -m fastmvit.kernels check``'s compiler."""
    from ..kernels._common import CompileConfig
    from ..kernels.check import compile_config

    start = time.perf_counter()
    try:
        signature, constexprs, aligned = {}, {}, []
        for name, value in launch.args:
            if isinstance(value, tuple) and value[0] == "tensor":
                signature[name] = "*" + value[1]
            elif isinstance(value, tuple) and value[0] == "int":
                if value[1]:  # Triton turns an integer equal to 1 into a constexpr
                    signature[name], constexprs[name] = "constexpr", 1
                else:
                    signature[name] = "i32" if value[3] else "i64"
                    if value[2]:
                        aligned.append(name)
            elif value == ("float",):
                signature[name] = "fp32"
            else:
                signature[name], constexprs[name] = "constexpr", value
        options = dict(launch.options)
        cfg = CompileConfig(launch.name, _kernel(launch), signature, constexprs,
                            num_warps=options.get("num_warps", 4), num_stages=options.get("num_stages", 3),
                            aligned=tuple(aligned))
        compile_config(cfg, arch)
        return launch.describe(), time.perf_counter() - start, ""
    except Exception as e:
        return launch.describe(), time.perf_counter() - start, f"{type(e).__name__}: {str(e)[:300]}"


def compile_launches(launches: Sequence[Launch], target: str = "cuda", jobs: Optional[int] = None,
                     device_index: int = 0) -> Tuple[float, List[str], int]:
    """Compile each distinct launch in ``jobs`` spawned processes (default: all cores). ``target``:
    "cuda" (the current GPU, into Triton's cache) or "sm_90" / "sm_80" (ahead of time, no GPU).
    Returns (wall seconds, failures, jobs)."""
    specs = distinct(launches)
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(specs)))
    if target == "cuda":
        fn, extra = _compile_on_gpu, device_index
    elif target.startswith("sm_") and target[3:].isdigit():
        fn, extra = _compile_ahead, int(target[3:])
    else:
        raise ValueError(f"target must be 'cuda' or 'sm_<arch>' (e.g. sm_90), got {target!r}")
    start = time.perf_counter()
    # spawn: a forked child of a process that initialised CUDA cannot use it
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init,
                             initargs=(target != "cuda",)) as pool:
        results = list(pool.map(fn, specs, [extra] * len(specs)))
    failures = [f"{what}: {err}" for what, _, err in results if err]
    return time.perf_counter() - start, failures, jobs


def warmup(model, batches: Iterable[int] = (1,), sizes: Iterable[Tuple[int, int]] = ((256, 256),),
           jobs: Optional[int] = None, target: Optional[str] = None) -> WarmupReport:
    """Compile every kernel specialisation ``model``'s engine launches (on the model's device, in its
    dtype) at these batch and image sizes. ``target``: None = "cuda" for a model on a GPU, else "sm_90"."""
    device = next(model.parameters()).device
    target = target or ("cuda" if device.type == "cuda" else "sm_90")
    if target != "cuda" and os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("an ahead-of-time warm-up records the GPU's launch configurations, which the "
                           "interpreter does not use: unset TRITON_INTERPRET")
    if target == "cuda" and device.type != "cuda":
        raise ValueError("target='cuda' warms Triton's cache for the model's GPU: move the model there first")
    start = time.perf_counter()
    from ..kernels._common import assume_arch

    # ahead of time: the launch rules of the target (sm_80's tiles differ from sm_90's), not sm_90's
    ahead = target.startswith("sm_") and target[3:].isdigit()
    with assume_arch(int(target[3:])) if ahead else contextlib.nullcontext():
        launches = record_launches(model, batches, sizes)
    record_s = time.perf_counter() - start
    index = device.index if device.index is not None else (torch.cuda.current_device() if target == "cuda" else 0)
    seconds, failures, used = compile_launches(launches, target, jobs, device_index=index)
    return WarmupReport(len(launches), distinct(launches), target, used, record_s, seconds, failures)


# -- command line -----------------------------------------------------------------------------------

def _ints(text: str) -> List[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise ValueError(f"expected positive integers separated by commas, got {text!r}")
    return values


def main(argv=None) -> int:
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m fastmvit warmup", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="s", help="variant (default s)")
    parser.add_argument("--dtype", default="float16", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--batch", default="1", help="batch sizes, comma-separated (default 1)")
    parser.add_argument("--size", default="256", help="image sizes: 256 or 256x192, comma-separated")
    parser.add_argument("--jobs", type=int, help="compiling processes (default: every core)")
    parser.add_argument("--target", help="cuda, or sm_90 / sm_80 to compile ahead of time without a GPU "
                                         "(default: cuda when a GPU is visible, else sm_90)")
    parser.add_argument("--device", help="cuda:N (default: the current CUDA device)")
    parser.add_argument("--list", action="store_true", help="only print the specialisations, compile nothing")
    parser.add_argument("--json", help="write the report here")
    args = parser.parse_args(argv)

    from .. import load

    try:
        batches = _ints(args.batch)
        sizes = []
        for s in args.size.split(","):
            h, _, w = s.partition("x")
            sizes.append((int(h), int(w or h)))
    except ValueError as e:
        parser.error(str(e))
    on_gpu = torch.cuda.is_available() and args.target in (None, "cuda")
    device = torch.device(args.device or "cuda") if on_gpu else torch.device("cpu")
    if args.target == "cuda" and not torch.cuda.is_available():
        parser.error("--target cuda needs a visible GPU; use --target sm_90 to compile ahead of time")
    dtype = getattr(torch, args.dtype)
    model = load(args.model, pretrained=False, backend="triton", device=device, dtype=dtype)
    if args.list:
        launches = record_launches(model, batches, sizes)
        for launch in distinct(launches):
            print(launch.describe())
        print(f"{len(distinct(launches))} specialisations, {len(launches)} launches")
        return 0
    report = warmup(model, batches, sizes, jobs=args.jobs, target=args.target)
    print(report.summary())
    for failure in report.failures:
        print(f"  FAILED {failure}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "dtype": args.dtype, "batches": batches, "sizes": sizes,
                       "launches": report.launches, "specialisations": len(report.specialisations),
                       "mode": report.mode, "jobs": report.jobs, "record_s": report.record_s,
                       "compile_s": report.compile_s, "failures": report.failures}, f, indent=1)
    return 1 if report.failures else 0
