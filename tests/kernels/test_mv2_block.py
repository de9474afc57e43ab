"""fastmvit::inverted_residual (the fused MobileNetV2 block) against its PyTorch reference and against
fastmvit.model.blocks.InvertedResidual with folded BatchNorm; the unfused path; the fusion rule."""
import pytest
import torch

from fastmvit.engine.fold import fold_bn
from fastmvit.kernels import mv2_block as K
from fastmvit.kernels.dwconv import out_size
from fastmvit.model.blocks import InvertedResidual
from fastmvit.ops.mv2_block import (inverted_residual, inverted_residual_reference, inverted_residual_unfused,
                                    pack_inverted_residual, should_fuse)

from ..utils import randomize_
from .common import DEVICE, DTYPES, assert_within_torch_error, compiled_resources, dtype_id, needs_gpu, poison

# (B, H, W, Cin, hidden, Cout, stride): expansion 2 and 4, residual (s1, Cin == Cout) or not, odd and
# non-square maps, 1x1 and 2x3 maps, hidden over one interpreter chunk (192 = 128 + a masked 64).
CASES = [
    (2, 7, 9, 16, 32, 16, 1),
    (1, 7, 9, 24, 96, 24, 1),
    (2, 7, 9, 16, 64, 24, 2),
    (1, 9, 7, 24, 48, 48, 2),
    (1, 1, 1, 16, 32, 16, 1),
    (2, 1, 1, 16, 32, 24, 2),
    (1, 2, 3, 40, 80, 40, 1),
    (1, 3, 4, 24, 192, 40, 1),
]


def case_id(c):
    B, H, W, cin, hid, cout, s = c
    res = "-res" if s == 1 and cin == cout else ""
    return f"B{B}-H{H}W{W}-{cin}x{hid // cin}-{cout}-s{s}{res}"


def random_weights(cin, hidden, cout, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(hidden, cin, generator=g) / cin ** 0.5, torch.randn(hidden, generator=g) * 0.1,
            torch.randn(hidden, 1, 3, 3, generator=g) / 3, torch.randn(hidden, generator=g) * 0.1,
            torch.randn(cout, hidden, generator=g) / hidden ** 0.5, torch.randn(cout, generator=g) * 0.1)


def packed(weights, stride, dtype):
    return pack_inverted_residual(*(w.to(DEVICE) for w in weights), stride=stride, dtype=dtype)


def run_poisoned(x, p):
    B, H, W, _ = x.shape
    y = poison(x.new_empty((B, out_size(H, p.stride), out_size(W, p.stride), p.cout)))
    return K.inverted_residual_launch(x, p.w1, p.b1, p.wdw, p.bdw, p.w3, p.b3, y, p.stride, p.residual)


def check(out, x, weights, stride, dtype, what):
    ref64 = inverted_residual_reference(x.double(), packed(weights, stride, torch.float64))
    assert_within_torch_error(out, ref64, inverted_residual_reference(x, packed(weights, stride, dtype)), what)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_fused_kernel(case, dtype):
    B, H, W, cin, hidden, cout, stride = case
    weights = random_weights(cin, hidden, cout)
    x = torch.randn(B, H, W, cin, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    p = packed(weights, stride, dtype)
    assert p.residual == (stride == 1 and cin == cout)
    check(run_poisoned(x, p), x, weights, stride, dtype, f"{case_id(case)}-{dtype_id(dtype)}")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", [CASES[0], CASES[3]], ids=case_id)
def test_unfused_path(case, dtype):
    """Expand (torch.addmm) -> fastmvit::dwconv3x3 -> project, the pieces the engine composes."""
    B, H, W, cin, hidden, cout, stride = case
    weights = random_weights(cin, hidden, cout, seed=2)
    x = torch.randn(B, H, W, cin, generator=torch.Generator().manual_seed(3)).to(DEVICE, dtype)
    out = inverted_residual(x, packed(weights, stride, dtype), fused=False)
    check(out, x, weights, stride, dtype, f"unfused {case_id(case)}")


def test_unfused_path_takes_engine_gemms():
    """The expand/project hooks receive [pixels, channels] matrices and their results are used."""
    weights = random_weights(16, 32, 16)
    p = packed(weights, 1, torch.float32)
    x = torch.randn(1, 3, 4, 16, device=DEVICE)
    seen = []

    def expand(x2d, w1, b1):
        seen.append(("expand", tuple(x2d.shape), tuple(w1.shape)))
        return torch.nn.functional.silu(x2d @ w1 + b1)

    def project(h2d, w3, b3, res2d):
        seen.append(("project", tuple(h2d.shape), res2d is not None))
        return h2d @ w3 + b3 + res2d

    out = inverted_residual_unfused(x, p, expand=expand, project=project)
    assert seen == [("expand", (12, 16), (16, 32)), ("project", (12, 32), True)]
    check(out, x, weights, 1, torch.float32, "hooks")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("cin,cout,stride,expand", [(16, 16, 1, 2), (16, 24, 2, 4), (24, 24, 1, 4)],
                         ids=["16-16-s1-e2", "16-24-s2-e4", "24-24-s1-e4"])
def test_matches_model_block(cin, cout, stride, expand, dtype):
    """The fused kernel on folded weights reproduces fastmvit.model.blocks.InvertedResidual (random
    weights, random BatchNorm statistics) within 2x PyTorch's own error in the same dtype."""
    block = randomize_(InvertedResidual(cin, cout, stride, expand), seed=4).eval()
    folded = []
    for cna in (block.conv1_1x1, block.conv2_kxk, block.conv3_1x1):
        folded += fold_bn(cna.conv.weight, cna.bn)
    p = pack_inverted_residual(*(t.to(DEVICE) for t in folded), stride=stride, dtype=dtype)
    assert p.residual == block.has_residual
    x = torch.randn(2, 7, 9, cin, generator=torch.Generator().manual_seed(5)).to(DEVICE, dtype)
    with torch.no_grad():
        out = inverted_residual(x, p, fused=True)
        nchw = x.permute(0, 3, 1, 2)
        ref64 = block.double().to(DEVICE)(nchw.double()).permute(0, 2, 3, 1)
        same = block.to(dtype)(nchw).permute(0, 2, 3, 1)
    assert_within_torch_error(out, ref64, same, f"InvertedResidual {cin}->{cout} s{stride} e{expand}")


def test_fusion_rule():
    """The documented decisions: within the kernel's limits only; small stride-2 early blocks fuse at every
    batch; stride-1 blocks fuse at batch 1 on the widest map but not at batch 256 (SiLU recompute on the
    MUFU pipe)."""
    assert not should_fuse(192, 384, 192, 1, batch=1) and not should_fuse(64, 128, 512, 2, batch=1)
    for cin, hid, cout in ((16, 32, 24), (32, 64, 64)):
        assert all(should_fuse(cin, hid, cout, 2, height=128, width=128, batch=b) for b in (1, 8, 256))
    assert should_fuse(32, 128, 64, 2, height=128, width=128, batch=256)
    assert should_fuse(16, 32, 16, 1, height=128, width=128, batch=1)
    assert not should_fuse(16, 32, 16, 1, height=128, width=128, batch=256)
    x = torch.randn(1, 2, 3, 16, device=DEVICE)  # fused=None follows the rule: a tiny map at batch 1 fuses
    p = packed(random_weights(16, 32, 16), 1, torch.float32)
    torch.testing.assert_close(inverted_residual(x, p), inverted_residual(x, p, fused=True))


def test_fusion_rule_sees_small_grids_with_long_serial_loops(monkeypatch):
    """MobileViT-S at batch 1, 256x256: the fused kernel of stages 3, 4 and 5 would run 16 CTAs x 72
    serial steps, 4 x 108 and 1 x 144 (the review's counts); the latency term keeps them unfused. Without
    it (STEP_FUSED = 0) the roofline alone fuses stage 5, as the rule did before."""
    import fastmvit.ops.mv2_block as mb

    stages = {(64, 256, 96, 64): (16, 72), (96, 384, 128, 32): (4, 108), (128, 512, 160, 16): (1, 144)}
    for (cin, hid, cout, side), (ctas, steps) in stages.items():
        assert mb.kernel_shapes(cin, hid, cout, 2, height=side, width=side, batch=1)["fused"][:2] == (ctas, steps)
        est = mb.fusion_estimate(cin, hid, cout, 2, height=side, width=side, batch=1)
        assert est["fused_latency"] == pytest.approx(steps * mb.STEP_FUSED)
        assert est["fused"] > est["unfused"] and not should_fuse(cin, hid, cout, 2, height=side, width=side, batch=1)
    assert mb.latency(mb.SMS + 1, 10, 1.0) == 20 and mb.latency(2 * mb.SMS, 10, 1.0, ctas_per_sm=2) == 10
    monkeypatch.setattr(mb, "STEP_FUSED", 0.0)
    est = mb.fusion_estimate(128, 512, 160, 2, height=16, width=16, batch=1)
    assert est["fused"] < 4e-6 and est["fused"] <= mb.FUSE_MARGIN * est["unfused"]


def test_bad_arguments_raise_clearly():
    weights = random_weights(16, 32, 16)
    with pytest.raises(ValueError, match="residual needs stride 1"):
        pack_inverted_residual(*weights, stride=2, dtype=torch.float32, residual=True)
    p = packed(weights, 1, torch.float16)
    with pytest.raises(ValueError, match="activation dtype"):
        inverted_residual(torch.randn(1, 3, 3, 16, device=DEVICE), p, fused=True)
    big = packed(random_weights(192, 384, 192), 1, torch.float32)
    with pytest.raises(ValueError, match="unfused path"):
        inverted_residual(torch.randn(1, 2, 2, 192, device=DEVICE), big, fused=True)


def test_gradient_request_raises():
    p = packed(random_weights(16, 32, 16), 1, torch.float32)
    x = torch.randn(1, 3, 3, 16, device=DEVICE, requires_grad=True)
    with pytest.raises(RuntimeError, match="inference-only"):
        inverted_residual(x, p, fused=True)


def test_op_registration():
    p = packed(random_weights(16, 32, 16), 1, torch.float32)
    x = torch.randn(1, 3, 4, 16, device=DEVICE)
    torch.library.opcheck(torch.ops.fastmvit.inverted_residual.default, (x, p.w1, p.b1, p.wdw, p.bdw, p.w3, p.b3),
                          {"stride": 1, "residual": True}, test_utils=("test_schema", "test_autograd_registration"))


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", [(8, 128, 128, 16, 32, 16, 1), (8, 128, 128, 32, 128, 64, 2),
                                  (16, 64, 64, 64, 128, 128, 2), (4, 33, 31, 128, 256, 256, 2),
                                  (32, 16, 16, 96, 384, 128, 2)], ids=case_id)
def test_fused_kernel_full_size(case, dtype):
    B, H, W, cin, hidden, cout, stride = case
    weights = random_weights(cin, hidden, cout)
    x = torch.randn(B, H, W, cin, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    check(run_poisoned(x, packed(weights, stride, dtype)), x, weights, stride, dtype, case_id(case))


@needs_gpu
def test_opcheck_full():
    p = packed(random_weights(32, 64, 32), 1, torch.float16)
    x = torch.randn(2, 9, 7, 32, device=DEVICE, dtype=torch.float16)
    torch.library.opcheck(torch.ops.fastmvit.inverted_residual.default, (x, p.w1, p.b1, p.wdw, p.bdw, p.w3, p.b3),
                          {"stride": 1, "residual": True})


def test_compiles_for_sm90_without_spills():
    """The largest fused blocks (Cin 128, Cout 256, stride 2) and a residual block, in fp16 and fp32
    (all of them: ``python -m fastmvit.kernels check``): no spills, wgmma for 16-bit."""

    cfgs = K.compile_configs()
    pick = [next(c.name for c in cfgs if c.constexprs["BLOCK_CI"] == 128 and c.constexprs["BLOCK_CO"] == 256
                 and c.constexprs["STRIDE"] == 2 and c.name.endswith(dt)) for dt in ("fp16", "fp32")]
    pick.append(next(c.name for c in cfgs if c.constexprs["RESIDUAL"] and c.name.endswith("bf16")))
    for use in compiled_resources(K.__name__, pick):
        assert use["stack"] == 0, use
        assert (use["wgmma"] > 0) == (not use["name"].endswith("fp32")), use


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_small_tiles_cover_ragged_edges(monkeypatch, dtype):
    """Force 16-pixel tiles and 16-channel hidden chunks: several programs (the last ragged: 35 pixels)
    and three chunks of the 48 hidden channels accumulated into the projection."""
    real = K.fused_config
    monkeypatch.setattr(K, "fused_config", lambda cin, hidden, cout, dtype, M=0, interpret=None, arch=90:
                        (16,) + real(cin, hidden, cout, dtype, M, interpret=True)[1:2] + (16,)
                        + real(cin, hidden, cout, dtype, M, interpret=True)[3:])
    weights = random_weights(24, 48, 24)
    x = torch.randn(1, 5, 7, 24, generator=torch.Generator().manual_seed(2)).to(DEVICE, dtype)
    p = packed(weights, 1, dtype)
    check(run_poisoned(x, p), x, weights, 1, dtype, f"small-tiles-{dtype_id(dtype)}")
