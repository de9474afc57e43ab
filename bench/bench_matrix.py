"""What the benchmark suites share: the device, the default matrices and the --bench-* options' parsing."""
import pytest
import torch

from fastmvit.benchmark import engines as E

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")

MATRIX = {
    "cuda": dict(models="xxs,xs,s,v2-0.5,v2-1.0,v2-2.0", batches="1,8,64,256", dtypes="float32,float16,bfloat16",
                 engines=",".join(n for n, e in E.ENGINES.items() if not e.opt_in), seconds=1.0, min_rounds=10),
    "cpu": dict(models="xxs,v2-0.5", batches="1,8", dtypes="float32", engines="fastmvit,hf-eager,timm-eager",
                seconds=2.0, min_rounds=5),
}
DEFAULTS = MATRIX["cuda" if ON_GPU else "cpu"]


def csv(s):
    return [x.strip() for x in str(s).split(",") if x.strip()]


def matrix(config):
    engines = csv(config.getoption("--bench-engines"))
    if config.getoption("--bench-max-autotune") and "compile-max-autotune" not in engines:
        engines.append("compile-max-autotune")
    unknown = [e for e in engines if e not in E.ENGINES]
    if unknown:
        raise pytest.UsageError(f"unknown engine(s) {unknown}; known: {', '.join(E.ENGINES)}")
    return (csv(config.getoption("--bench-models")), [int(b) for b in csv(config.getoption("--bench-batches"))],
            csv(config.getoption("--bench-dtypes")), engines)
