"""The kernel tests run with Triton's interpreter asserting that no 32-bit integer arithmetic overflows
(tests/conftest.py turns that on in tests/kernels/ and off for the whole-model tests elsewhere)."""
import pytest
import torch
import triton
import triton.language as tl
from triton.runtime.errors import InterpreterError

from tests.conftest import _set_overflow_checks
from tests.kernels.common import ON_GPU


@triton.jit
def _scaled_index_kernel(out_ptr, n):
    i = tl.arange(0, 16)
    tl.store(out_ptr + i, i * n)  # int32 * int32: overflows for a large n


@pytest.mark.skipif(ON_GPU, reason="the interpreter's overflow check (CPU only)")
def test_int32_overflow_is_caught_in_kernel_tests():
    out = torch.zeros(16, dtype=torch.int32)
    _scaled_index_kernel[(1,)](out, 1000)
    assert out[15].item() == 15000
    with pytest.raises(InterpreterError, match="int32 overflow detected for operation mul"):
        _scaled_index_kernel[(1,)](out, 2 ** 30)
    _set_overflow_checks(False)  # what the whole-model tests run with: wraps silently
    _scaled_index_kernel[(1,)](out, 2 ** 30)  # (the autouse fixture restores the options)
