"""Whole-model throughput, every engine side by side: ``pytest bench/ --benchmark-only``.

One benchmark per (variant, batch, dtype, engine), grouped by (variant, batch, dtype) so pytest-benchmark's
table compares the engines of one point. Inputs are prepared outside the timed call, the engine's
warm-up (compilation, CUDA-graph capture) runs before timing, and every timed call ends with a device
synchronise. An engine that cannot run here is skipped with the reason.
"""
import pytest

from fastmvit.benchmark import engines as E
from fastmvit.benchmark.harness import Budget, synchronized, time_call, warm_up
from fastmvit.benchmark.results import Result, Stats

from bench_matrix import DEVICE, matrix


def pytest_generate_tests(metafunc):
    if "point" in metafunc.fixturenames:
        models, batches, dtypes, engines = matrix(metafunc.config)
        points = [(m, b, d, e) for m in models for d in dtypes for b in batches for e in engines]
        metafunc.parametrize("point", points, ids=[f"{m}-b{b}-{E.DTYPE_SHORT[d]}-{e}" for m, b, d, e in points])


def test_model(benchmark, bench_run, point, request):
    measure_point(benchmark, bench_run, point, request, request.config.getoption("--bench-size"))


def measure_point(benchmark, bench_run, point, request, size):
    """Time one (model, batch, dtype, engine) at ``size`` x ``size`` and record it in the run's results."""
    variant, batch, dtype, name = point
    engine = E.ENGINES[name]
    benchmark.group = f"{variant} b{batch} {dtype}"
    try:
        prepared = engine.build(variant, batch, dtype, DEVICE, size)
    except E.Unavailable as u:
        bench_run.results.append(Result(variant, batch, dtype, name, "unavailable", str(u), size=size))
        pytest.skip(f"{name}: {u}")
    except Exception as ex:
        if engine.source == "fastmvit":
            raise  # fastmvit itself must run everywhere it says it does
        bench_run.results.append(Result(variant, batch, dtype, name, "failed", f"{type(ex).__name__}: {ex}", size=size))
        pytest.skip(f"{name} failed to build: {type(ex).__name__}: {ex}")
    try:
        out = prepared.fn()  # a benchmark of an engine that computes nothing useful would mean nothing
        assert tuple(out.shape) == (batch, 1000) and bool(out.isfinite().all()), f"{name}: bad logits {out.shape}"
        warm = sum(warm_up(prepared.fn, DEVICE, max(engine.warmup, 1)))
        per_call = time_call(prepared.fn, DEVICE)
        budget = Budget(min_rounds=request.config.getoption("--bench-min-rounds"),
                        seconds=request.config.getoption("--bench-seconds"))
        rounds = budget.rounds_for(per_call)
        benchmark.extra_info.update(variant=variant, batch=batch, dtype=dtype, engine=name, size=size,
                                    device=bench_run.meta["device"])
        benchmark.pedantic(synchronized(prepared.fn, DEVICE), rounds=rounds, iterations=1, warmup_rounds=0)
    finally:
        prepared.close()
    if benchmark.stats is None:  # --benchmark-disable: ran once, nothing timed
        return
    s = benchmark.stats.stats
    stats = Stats(median=s.median * 1e3, q1=s.q1 * 1e3, q3=s.q3 * 1e3, min=s.min * 1e3, mean=s.mean * 1e3,
                  std=s.stddev * 1e3, rounds=s.rounds)
    result = Result(variant, batch, dtype, name, "ok", ms=stats, warmup_s=warm, size=size)
    benchmark.extra_info.update(images_per_s=result.images_per_s, ms_per_batch=stats.median)
    bench_run.results.append(result)
