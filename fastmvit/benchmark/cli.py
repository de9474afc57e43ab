"""``python -m fastmvit bench``: compare fastmvit with eager PyTorch (and more) on this device.

    python -m fastmvit bench                      # the quick comparison: prints a table
    python -m fastmvit bench --compile --json r.json --report out/
    python -m fastmvit bench report r.json --out out/   # Markdown table and PNG plots from a results file
    python -m fastmvit bench roofline --models s,v2-1.0 --batches 1,256 --dtypes float16
    python -m fastmvit bench kernels              # fused kernels against the eager ops (CUDA)
    python -m fastmvit bench engines              # every engine and whether it can run here
    python -m fastmvit bench host                 # host (Python) cost per forward, launches stubbed
"""
from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path
from typing import Callable, List, Optional

import torch

from . import engines as E
from .harness import Budget, measure_interleaved, progress
from .peaks import device_peak
from .report import render_terminal, write_report
from .results import Result, Run, busy_reasons, environment, finish
from .roofline import roofline_row
from ..api import parse_device
from ..errors import OptionError
from ..variants import get_variant

# The quick defaults: about 25 s on an idle 2-core CPU (minutes on a busy one); the key points on a GPU.
DEFAULTS = {"cpu": dict(models="xxs,s", batches="1,8", dtypes="float32", seconds=2.0, min_rounds=5, warmup=1),
            "cuda": dict(models="s", batches="1,8,64,256", dtypes="float16", seconds=1.0, min_rounds=20, warmup=2)}


def _csv(s: str) -> List[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def _device(name: Optional[str]) -> torch.device:
    device = parse_device(name)
    if device.type not in ("cpu", "cuda"):
        raise OptionError(f"the bench runs on cpu or cuda, not {name!r}")
    return device


def _positive_ints(s: str, what: str) -> List[int]:
    try:
        values = [int(x) for x in _csv(s)]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise OptionError(f"{what} must be positive integers, comma-separated (e.g. 1,8); got {s!r}")
    return values


def _add_matrix(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", help="variants, comma-separated (default: cpu xxs,s; cuda s); segmentation "
                                    "models as deeplabv3-<variant> (with --size 512)")
    p.add_argument("--batches", help="batch sizes (default: cpu 1,8; cuda 1,8,64,256)")
    p.add_argument("--dtypes", help="float32, float16, bfloat16 (default: cpu float32; cuda float16)")
    p.add_argument("--size", type=int, default=256, help="image side (default 256)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--no-measure-peak", action="store_true",
                   help="use datasheet peaks instead of measuring copy bandwidth and GEMM FLOP/s")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastmvit bench", description=__doc__.replace("``", ""),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_matrix(p)
    p.add_argument("--engines", help="engines, comma-separated (default: the quick set; see `bench engines`)")
    p.add_argument("--compile", action="store_true", help="add torch.compile: default mode, and reduce-overhead (CUDA graphs) on CUDA")
    p.add_argument("--max-autotune", action="store_true", help="add torch.compile(mode='max-autotune'): minutes")
    p.add_argument("--kernels", action="store_true", help="also run the kernel microbenchmarks (CUDA)")
    p.add_argument("--seconds", type=float, help="time budget per (model, batch, dtype), all engines together")
    p.add_argument("--min-rounds", type=int, help="timed calls per engine at least")
    p.add_argument("--max-rounds", type=int, default=200, help="timed calls per engine at most")
    p.add_argument("--warmup", type=int, help="untimed calls per engine at least (default: cpu 1, cuda 2)")
    p.add_argument("--no-check", action="store_true", help="skip the logits check against the float32 torch path")
    p.add_argument("--json", help="write the results file here")
    p.add_argument("--report", metavar="DIR", help="write results.json, report.md and plots into DIR")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's, one per core); on a busy "
                                               "machine fewer threads can be much faster")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def run_matrix(models, batches, dtypes, engines: List[E.Engine], device: torch.device, budget: Budget,
               size: int = 256, check: bool = True, show_progress: bool = True,
               on_point: Optional[Callable[[List[Result]], None]] = None) -> List[Result]:
    """Measure every engine at every (model, dtype, batch), the engines of one point interleaved.
    ``on_point(results)`` after each point (to save partial results of a long sweep)."""
    results: List[Result] = []
    points = [(m, d, b) for m in models for d in dtypes for b in batches]
    for variant, dtype, batch in progress(points, len(points), "bench", show_progress):
        built, warm = {}, {}
        for e in engines:
            try:
                built[e.name] = e.build(variant, batch, dtype, device, size)
                warm[e.name] = e.warmup
            except E.Unavailable as u:
                results.append(Result(variant, batch, dtype, e.name, "unavailable", str(u), size=size))
            except Exception as ex:  # a library that breaks on this shape/dtype: report, go on
                results.append(Result(variant, batch, dtype, e.name, "failed", f"{type(ex).__name__}: {ex}",
                                      size=size))
        timed = measure_interleaved({n: p.fn for n, p in built.items()}, device, budget, warm)
        reference = None
        if check and built:
            ref_engine = E.Engine("reference", "", "torch")
            with torch.inference_mode():
                reference = ref_engine.build(variant, batch, "float32", device, size).fn().float()
        for name, (stats, warm_s) in timed.items():
            if isinstance(stats, Exception) or stats is None:
                results.append(Result(variant, batch, dtype, name, "failed",
                                      f"{type(stats).__name__}: {stats}", size=size))
                continue
            diff = None
            if reference is not None:
                try:
                    diff = (built[name].fn().float() - reference).abs().max().item()
                except Exception:
                    pass
            results.append(Result(variant, batch, dtype, name, "ok", ms=stats, warmup_s=warm_s,
                                  max_abs_diff=diff, size=size))
        for p in built.values():
            p.close()
        del built, reference
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if on_point is not None:
            on_point(results)
    order = {e.name: i for i, e in enumerate(engines)}
    results.sort(key=lambda r: (models.index(r.variant), dtypes.index(r.dtype), r.batch, order.get(r.engine, 99)))
    return results


def _model_name(name: str) -> str:
    """A variant's short name, or "deeplabv3-<variant>" for a segmentation model."""
    from ..segmentation import PREFIX, is_segmentation_name, segmentation_variant

    return PREFIX + segmentation_variant(name).name if is_segmentation_name(name) else get_variant(name).name


def _roofline(models, batches, dtypes, peak, size) -> List[dict]:
    from ..segmentation import is_segmentation_name

    models = [m for m in models if not is_segmentation_name(m)]  # the traffic model knows classifiers only
    if size % 64:
        print(f"note: no roofline at {size}x{size} (the traffic model takes multiples of 64)", file=sys.stderr)
        return []
    return [roofline_row(m, b, dt, peak, size) for m in models for dt in dtypes for b in batches]


def _matrix(args, device):
    d = DEFAULTS["cuda" if device.type == "cuda" else "cpu"]
    models = [_model_name(m) for m in _csv(args.models or d["models"])]
    batches = _positive_ints(args.batches or d["batches"], "--batches")
    dtypes = _csv(args.dtypes or d["dtypes"])
    bad = [x for x in dtypes if x not in E.DTYPES]
    if bad or not dtypes:
        raise OptionError(f"unknown dtype(s) {bad}; use float32, float16, bfloat16")
    if args.size < 32:
        raise OptionError(f"--size must be at least 32 (MobileViT downsamples by 32), got {args.size}")
    return models, batches, dtypes, d


def _cmd_run(argv: List[str]) -> int:
    args = _parser().parse_args(argv)
    device = _device(args.device)
    models, batches, dtypes, d = _matrix(args, device)
    engines = E.select(_csv(args.engines) if args.engines else None, device, args.compile, args.max_autotune)
    if args.threads is not None:
        if args.threads < 1:
            raise OptionError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    budget = Budget(warmup=d["warmup"] if args.warmup is None else args.warmup,
                    min_rounds=args.min_rounds or d["min_rounds"], max_rounds=args.max_rounds,
                    seconds=args.seconds or d["seconds"])
    meta = environment(device)
    meta["size"] = args.size
    meta["runs"] = {e.name: e.runs_on(device, dtypes[0])[1] for e in engines}  # (a row's first dtype)
    meta["computes_reference"] = [e.name for e in engines if e.computes_reference(device)]
    early = busy_reasons(meta)
    if early:
        print(f"note: the machine is busy ({'; '.join(early)}): the timings will be noisy", file=sys.stderr)
    meta["peak"] = device_peak(device, meta["device"], not args.no_measure_peak, dtypes)
    run = Run(meta)
    targets = ([Path(args.json)] if args.json else []) + ([Path(args.report) / "results.json"] if args.report else [])

    def save_partial(results):  # a sweep cut short (a time limit) still leaves what it measured
        run.results = list(results)
        for t in targets:
            run.save(t)

    run.results = run_matrix(models, batches, dtypes, engines, device, budget, args.size, not args.no_check,
                             not args.quiet, save_partial)
    run.roofline = _roofline(models, batches, dtypes, meta["peak"], args.size)
    finish(meta)
    if args.kernels:
        from . import kernels

        for dt in dtypes:
            run.kernels += kernels.run(device, E.DTYPES[dt], meta["peak"])
    print(render_terminal(run))
    for t in targets:
        print(f"results: {run.save(t)}")
    if args.report:
        _print_report(write_report(run, args.report))
    return 0


def _print_report(out: dict) -> None:
    print(f"report: {out['markdown']}" + "".join(f", {x}" for x in out["plots"])
          + (f" ({out['note']})" if out["note"] else ""))


def _cmd_report(argv: List[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m fastmvit bench report",
                                description="Markdown table and PNG plots from a results file")
    p.add_argument("results", nargs="+",
                   help="results JSON (from `bench --json`, `bench --report` or pytest bench/); several files "
                        "of one device are merged")
    p.add_argument("--out", help="folder for report.md and the plots (default: beside the first results file)")
    p.add_argument("--save", help="also write the (merged) results file here")
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)
    run = Run.merge([Run.load(f) for f in args.results])
    if args.save:
        run.save(args.save)
    out = write_report(run, args.out or Path(args.results[0]).parent, plots=not args.no_plots)
    print(render_terminal(run))
    _print_report(out)
    return 0


def _cmd_roofline(argv: List[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m fastmvit bench roofline",
                                description="FLOPs, bytes and floor time of each variant on this device")
    _add_matrix(p)
    args = p.parse_args(argv)
    device = _device(args.device)
    models, batches, dtypes, _ = _matrix(args, device)
    meta = environment(device)
    peak = device_peak(device, meta["device"], not args.no_measure_peak, dtypes)
    run = Run(meta | {"peak": peak},
              roofline=_roofline(models, batches, dtypes, peak, args.size))
    from .report import render_markdown

    print(render_markdown(run))
    return 0


def _cmd_kernels(argv: List[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m fastmvit bench kernels",
                                description="fused kernels against the eager ops they replace (CUDA)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--dtypes", default="float16")
    p.add_argument("--models", default="s,v2-1.0", help="variants whose shapes to use")
    p.add_argument("--family", help="only this family (attention, sepattn, dwconv, gemm, pool)")
    p.add_argument("--device")
    p.add_argument("--json", help="write the results file here")
    args = p.parse_args(argv)
    device = _device(args.device)
    from . import kernels
    from .report import render_markdown

    families = sorted({c.family for c in kernels.cases(1, [get_variant(m).name for m in _csv(args.models)])})
    if args.family is not None and args.family not in families:
        raise OptionError(f"unknown kernel family {args.family!r}; known: {', '.join(families)}")
    dtypes = _csv(args.dtypes)
    if not dtypes or any(dt not in E.DTYPES for dt in dtypes):
        raise OptionError(f"--dtypes takes float32, float16, bfloat16; got {args.dtypes!r}")
    meta = environment(device)
    meta["peak"] = device_peak(device, meta["device"], device.type == "cuda", dtypes)
    run = Run(meta)
    for dt in dtypes:
        run.kernels += kernels.run(device, E.DTYPES[dt], meta["peak"], args.batch, _csv(args.models), args.family)
    print(render_markdown(run))
    if args.json:
        print(f"results: {run.save(args.json)}")
    return 0


def _cmd_engines(argv: List[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m fastmvit bench engines", description="engines and availability")
    p.add_argument("--device")
    p.add_argument("--dtype", default="float16")
    args = p.parse_args(argv)
    device = _device(args.device)
    if args.dtype not in E.DTYPES:
        raise OptionError(f"--dtype takes float32, float16, bfloat16; got {args.dtype!r}")
    print(f"engines on {device} ({args.dtype}): what each runs here, and whether it can run")
    for e in E.ENGINES.values():
        try:
            e.check(device, args.dtype)
            state = "available" + (" (opt-in)" if e.opt_in else "")
            what = e.runs_on(device)[1]
        except E.Unavailable as u:
            state, what = f"unavailable: {u}", e.label
        print(f"{e.name:<24} {what:<62} {state}")
    return 0


def _cmd_host(argv: List[str]) -> int:
    from .host import main as host_main

    return host_main(argv)


COMMANDS = {"host": _cmd_host, "report": _cmd_report, "roofline": _cmd_roofline, "kernels": _cmd_kernels, "engines": _cmd_engines,
            "run": _cmd_run}


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in COMMANDS:
        return COMMANDS[argv[0]](argv[1:])
    return _cmd_run(argv)
