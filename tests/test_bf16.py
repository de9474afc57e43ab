"""bfloat16 through the whole fused engine on the CPU (on a GPU, test_engine.py and the kernel tests cover it).

Triton's interpreter stores bfloat16 as uint16, and its tl.dot multiplies those integers (triton 3.9,
``InterpreterBuilder.create_dot``): every GEMM-shaped kernel returns garbage in bfloat16 there, while
element-wise bfloat16 (loads, conversions, arithmetic, stores) is right. The fixture widens bfloat16 dot
operands to float32 first, which is exact (every bfloat16 is a float32, and the GPU's bfloat16 MMA
multiplies exactly and accumulates in float32), so the kernels' own bfloat16 code runs as written. What
stays unchecked on the CPU: the compiled MMA's accumulation order and the real conversion instructions.
"""
import os
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastmvit

from .kernels.common import DEVICE
from .utils import images, randomize_


@pytest.fixture
def bf16_dot(monkeypatch):
    if os.environ.get("TRITON_INTERPRET") != "1":  # only the interpreter's dot needs widening
        return
    import triton.language as tl
    from triton.runtime import interpreter

    original = interpreter.InterpreterBuilder.create_dot

    def widen(h):
        if h.dtype == tl.bfloat16:
            bits = h.data.astype(np.uint32) << 16
            return interpreter.TensorHandle(bits.view(np.float32), tl.float32)
        return h

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", create_dot)


@pytest.mark.parametrize("name", ["xxs", "v2-0.5"])
def test_bfloat16_engine_points_the_same_way_as_float32(name, bf16_dot):
    ref = randomize_(fastmvit.load(name, pretrained=False, backend="torch"), seed=21).to(DEVICE)
    fused = fastmvit.load(name, weights=ref.state_dict(), backend="triton", device=DEVICE, dtype=torch.bfloat16)
    x = images((1, 3, 64, 64)).to(DEVICE)
    with torch.inference_mode():
        expected, got = ref(x), fused(x.bfloat16())
    assert got.dtype == torch.bfloat16 and not torch.isnan(got).any()
    cos = F.cosine_similarity(got.float(), expected, dim=1).min().item()
    assert cos >= 0.995, f"{name}: bfloat16 logits at cosine {cos:.6f} from float32's"
