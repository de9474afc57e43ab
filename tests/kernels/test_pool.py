"""Global mean pooling + classifier (fastmvit.ops.pool) against its reference, alone and after the GEMM's
pooling epilogue (v1's head: final 1x1 conv + BN + SiLU, pool, classifier)."""
import pytest
import torch

from fastmvit.kernels import pool as kp
from fastmvit.ops.gemm import linear, linear_reference, pack_linear
from fastmvit.ops.pool import classifier, pool_linear, pool_linear_reference
from tests.kernels.common import DEVICE, DTYPES, ON_GPU, assert_within_torch_error, dtype_id


def head(C, NC):
    return torch.randn(NC, C) / C ** 0.5, 0.5 * torch.randn(NC)


CASES = [  # (B, H, W, C, classes)
    (1, 1, 1, 16, 24),
    (3, 7, 5, 129, 1000),     # odd map and width
    (2, 10, 10, 257, 1025),   # several chunks of the map and of the channels
    (70, 2, 2, 24, 10),       # several blocks of samples
]


@pytest.mark.parametrize("dt", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("B,H,W,C,NC", CASES, ids=[f"B{b}-H{h}-W{w}-C{c}-NC{n}" for b, h, w, c, n in CASES])
def test_pool_linear(B, H, W, C, NC, dt):
    x = (torch.randn(B, H, W, C + 5, dtype=torch.float64) + 1).to(dtype=dt, device=DEVICE)[..., 2:2 + C]
    w, b = head(C, NC)
    out = pool_linear(x, pack_linear(w, b, dtype=dt, device=DEVICE))
    assert out.shape == (B, NC) and out.dtype == torch.float32
    assert_within_torch_error(out, pool_linear_reference(x.double(), w, b), pool_linear_reference(x, w, b),
                              f"B{B}-H{H}-W{W}-C{C}-NC{NC}-{dtype_id(dt)}")


@pytest.mark.parametrize("dt", DTYPES, ids=dtype_id)
def test_v1_head(dt):
    """Final 1x1 conv (BN folded) + SiLU with the pooling epilogue, then the classifier on the float32
    pooled features; against conv -> SiLU -> mean -> linear unfused."""
    B, H, W, C, F, NC = 2, 8, 8, 24, 80, 1000
    x = torch.randn(B * H * W, C, dtype=torch.float64).to(dtype=dt, device=DEVICE)
    wc, bc = torch.randn(F, C, 1, 1) / C ** 0.5, 0.3 * torch.randn(F)
    w, b = head(F, NC)
    feats = linear(x, pack_linear(wc, bc, dtype=dt, device=DEVICE), act="silu", pool=True, rows_per_sample=H * W)
    out = classifier(feats, pack_linear(w, b, dtype=dt, device=DEVICE))

    def reference(dtype):
        f = linear_reference(x.to(dtype), wc, bc, act="silu", pool=True, rows_per_sample=H * W)
        return torch.nn.functional.linear(f.to(dtype), w.to(dtype), b.to(dtype)).float()

    assert_within_torch_error(out, reference(torch.float64), reference(dt), f"v1-head-{dtype_id(dt)}")


def test_validation_and_opcheck():
    p = pack_linear(torch.randn(10, 16), torch.randn(10), device=DEVICE)
    with pytest.raises(ValueError, match="B, H, W, C"):
        pool_linear(torch.randn(2, 16), p)
    with pytest.raises(ValueError, match="channels"):
        classifier(torch.randn(2, 8), p)
    with pytest.raises(RuntimeError, match="inference-only"):
        classifier(torch.randn(2, 16, requires_grad=True), p)
    utils = None if ON_GPU else ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.fastmvit.pool_linear.default,
                          (torch.randn(3, 5, 16, device=DEVICE), p.weight, 10, p.bias),
                          test_utils=utils or torch.library._OPCHECK_DEFAULT_UTILS)


def test_compile_configs():
    cfgs = kp.compile_configs()
    assert len({c.name for c in cfgs}) == len(cfgs) == 15  # 12 classifiers, 3 DeepLabV3 pooling branches (ReLU)
    assert sum(c.constexprs["RELU"] for c in cfgs) == 3


@pytest.mark.parametrize("dt", DTYPES, ids=dtype_id)
def test_pool_linear_relu(dt):
    """DeepLabV3's image-pooling branch: mean -> 1x1 conv (+BN) -> ReLU, through the op and its launch plan;
    the bias is centred so about half the outputs are clipped."""
    from fastmvit.ops.pool import pool_linear_plan

    B, H, W, C, N = 3, 7, 5, 40, 48
    x = (torch.randn(B, H, W, C, dtype=torch.float64) + 1).to(dtype=dt, device=DEVICE)
    w, _ = head(C, N)
    b = -(w @ x.double().mean(dim=(0, 1, 2)).cpu().float())  # centred: some outputs below zero
    packed = pack_linear(w, b, dtype=dt, device=DEVICE)
    ref64 = pool_linear_reference(x.double(), w, b, relu=True)
    assert (ref64 == 0).any() and (ref64 > 0).any()
    for out in (pool_linear(x, packed, relu=True), pool_linear_plan(x, packed, relu=True)(x, packed)):
        assert_within_torch_error(out, ref64, pool_linear_reference(x, w, b, relu=True), f"relu-{dtype_id(dt)}")
