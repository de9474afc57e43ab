"""What every kernel test shares: devices, dtypes, NaN poisoning and the error bound.

The error bound (after flash-attention's tests): a kernel's max error against a float64 reference may be
at most ``FACTOR`` times PyTorch's own max error computing the same thing in the same dtype, plus a
small floor relative to the output's magnitude for when PyTorch happens to be exact. One table for all
kernels; never loosen it per test.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"

FACTOR = 2.0
# Floor relative to max |reference|, per dtype: a few units in the last place of the format.
REL_FLOOR = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])

dtype_id = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}.get


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill an output buffer with NaN so any element a kernel fails to write fails the test."""
    return t.fill_(float("nan"))


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def assert_within_torch_error(out: torch.Tensor, ref64: torch.Tensor, torch_same_dtype: torch.Tensor,
                              what: str = "") -> None:
    """``out`` (the kernel) and ``torch_same_dtype`` (PyTorch in the kernel's dtype) both against the
    float64 ``ref64``."""
    assert out.shape == ref64.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert not torch.isnan(out).any(), f"{what}: NaN in the output (an element left unwritten?)"
    err = max_err(out, ref64)
    err_torch = max_err(torch_same_dtype, ref64)
    floor = REL_FLOOR[out.dtype] * ref64.abs().max().item()
    bound = FACTOR * err_torch + floor
    assert err <= bound, (f"{what}: max error {err:.3g} > {FACTOR} x torch's {err_torch:.3g} + floor {floor:.3g} "
                          f"({out.dtype})")


needs_gpu = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")

_COMPILE = """
import json, sys
from fastmvit.kernels.check import resource_usage
mod = __import__(sys.argv[1], fromlist=["compile_configs"])
names, arch = set(json.loads(sys.argv[2])), int(sys.argv[3])
print(json.dumps([resource_usage(c, arch) for c in mod.compile_configs() if c.name in names]))
"""


def compiled_resources(module: str, names, arch: int = 90) -> list:
    """Compile the named specialisations of a kernel module for ``sm_<arch>`` and return what each costs
    (``fastmvit.kernels.check.resource_usage``). In a child process with the interpreter off: in the test
    process the kernels are interpreted and cannot be compiled."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    run = subprocess.run([sys.executable, "-c", _COMPILE, module, json.dumps(list(names)), str(arch)], env=env,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert sorted(u["name"] for u in out) == sorted(names), "a named specialisation does not exist"
    return out
