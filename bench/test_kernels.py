"""Kernel microbenchmarks: each fused op against the eager ops it replaces, at the released models'
shapes (``fastmvit.benchmark.kernels``). pytest-benchmark times the fused op; the fastmvit results file
gets both implementations timed by ``triton.testing.do_bench`` with GB/s, TFLOP/s and % of peak.
CUDA only: under the Triton interpreter a time means nothing."""
import pytest
import torch

from fastmvit.benchmark import kernels as K
from fastmvit.benchmark.engines import DTYPE_SHORT, DTYPES
from fastmvit.benchmark.harness import synchronized

from bench_matrix import DEVICE, ON_GPU


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        dtypes = [d for d in metafunc.config.getoption("--bench-dtypes").split(",") if d]
        cases = K.cases(metafunc.config.getoption("--bench-kernel-batch")) if ON_GPU else [None]
        points = [(c, d) for c in cases for d in dtypes]
        metafunc.parametrize("case,dtype", points,
                             ids=[f"{c.family}-{c.name}-{DTYPE_SHORT[d]}" if c else f"cpu-{DTYPE_SHORT[d]}"
                                  for c, d in points])


def test_kernel(benchmark, bench_run, case, dtype):
    if not ON_GPU:
        pytest.skip(K.GPU_ONLY)
    benchmark.group = f"kernel {case.family} {case.name}"
    row = K.measure_case(case, DEVICE, DTYPES[dtype], bench_run.meta["peak"])
    bench_run.kernels.append(row)
    if row["status"] != "ok":
        pytest.skip(f"{case.family}: {row['reason']}")
    fused, eager = case.make(DEVICE, DTYPES[dtype])
    got, expected = fused(), eager()  # the timed op must compute what it replaces (tests/kernels bound it)
    assert got.shape == expected.shape and bool(got.isfinite().all()), case.name
    torch.testing.assert_close(got.float(), expected.float(), rtol=0.05, atol=0.05 * expected.float().abs().max().item())
    benchmark.extra_info.update({k: v for k, v in row.items() if k in ("speedup", "bound", "gflop", "mb")})
    benchmark.pedantic(synchronized(fused, DEVICE), rounds=50, iterations=1, warmup_rounds=5)
    torch.cuda.empty_cache()
