"""pytest-benchmark suites: ``pytest bench/ --benchmark-only``.

On a CUDA machine the issue's full matrix (MobileViT xxs, xs, s and v2 0.5, 1.0, 2.0 at 256x256; batch 1,
8, 64, 256; float32, float16, bfloat16; every engine in ``fastmvit.benchmark.engines.ENGINES`` but
max-autotune, which ``--bench-max-autotune`` adds). On a CPU machine a small set that runs in a few
minutes: fastmvit's CPU path against eager HF and timm, xxs and v2-0.5, batch 1 and 8, float32. Narrow or
widen either with the --bench-* options. Besides pytest-benchmark's own table and JSON, the session writes
a fastmvit results file (``--bench-json``) that ``python -m fastmvit bench report`` renders.
"""
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # benchmarks never reach the network

from fastmvit.benchmark.results import Run, environment, finish  # noqa: E402

from bench_matrix import DEVICE, DEFAULTS, csv  # noqa: E402


def pytest_addoption(parser):
    g = parser.getgroup("fastmvit bench")
    g.addoption("--bench-models", default=DEFAULTS["models"], help="variants, comma-separated")
    g.addoption("--bench-batches", default=DEFAULTS["batches"], help="batch sizes, comma-separated")
    g.addoption("--bench-dtypes", default=DEFAULTS["dtypes"], help="float32,float16,bfloat16")
    g.addoption("--bench-engines", default=DEFAULTS["engines"], help="engine names (see `python -m fastmvit bench engines`)")
    g.addoption("--bench-max-autotune", action="store_true", help="add torch.compile(mode='max-autotune')")
    g.addoption("--bench-size", type=int, default=256, help="image side")
    g.addoption("--bench-seconds", type=float, default=DEFAULTS["seconds"], help="timing budget per benchmark")
    g.addoption("--bench-min-rounds", type=int, default=DEFAULTS["min_rounds"], help="timed calls at least")
    g.addoption("--bench-kernel-batch", type=int, default=64, help="batch of the kernel microbenchmarks' shapes")
    g.addoption("--bench-json", default=".benchmarks/fastmvit-bench.json", help="fastmvit results file to write")


def pytest_configure(config):
    config._fastmvit_run = None


@pytest.fixture(scope="session")
def bench_run(request):
    """The session's fastmvit results file: environment and measured peaks, filled by the benchmarks."""
    from fastmvit.benchmark.peaks import device_peak

    if request.config._fastmvit_run is None:
        meta = environment(DEVICE)
        meta["size"] = request.config.getoption("--bench-size")
        meta["peak"] = device_peak(DEVICE, meta["device"], True, csv(request.config.getoption("--bench-dtypes")))
        request.config._fastmvit_run = Run(meta)
    return request.config._fastmvit_run


def pytest_sessionfinish(session):
    run = session.config._fastmvit_run
    if run is None or not (run.results or run.kernels):
        return
    from fastmvit.benchmark.roofline import roofline_row

    from fastmvit.segmentation import is_segmentation_name

    points = sorted({(r.variant, r.batch, r.dtype, r.size) for r in run.results if r.status == "ok" and r.size % 64 == 0
                     and not is_segmentation_name(r.variant)})  # the traffic model knows classifiers only
    finish(run.meta)
    run.roofline = [roofline_row(v, b, d, run.meta["peak"], s) for v, b, d, s in points]
    session.config._fastmvit_path = run.save(session.config.getoption("--bench-json"))


def pytest_terminal_summary(terminalreporter, config):
    path = getattr(config, "_fastmvit_path", None)
    if path is None:
        return
    from fastmvit.benchmark.report import render_terminal

    terminalreporter.section("fastmvit bench")
    terminalreporter.write(render_terminal(config._fastmvit_run))
    terminalreporter.write_line(f"fastmvit results: {path} (render: python -m fastmvit bench report {path})")
