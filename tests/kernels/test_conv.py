"""fastmvit::conv3x3 (Triton implicit GEMM) against its PyTorch reference: the stem reading NCHW input,
the v1 local conv, the v1 fusion conv over [x, x2]."""
import pytest
import torch

from fastmvit.kernels import conv as K
from fastmvit.kernels.dwconv import out_size
from fastmvit.ops.conv import conv3x3, conv3x3_reference, pack_conv3x3

from .common import DEVICE, DTYPES, assert_within_torch_error, compiled_resources, dtype_id, needs_gpu, poison

# (B, H, W, C1, C2, Cout, stride, input_nchw)
CASES = [
    (2, 7, 9, 3, 0, 16, 2, True),      # stem on NCHW input, odd non-square map
    (1, 2, 3, 3, 0, 24, 2, True),
    (1, 1, 1, 3, 0, 64, 2, True),
    (2, 7, 9, 3, 0, 32, 2, False),     # stem on NHWC input (same gather, other strides)
    (2, 7, 9, 24, 0, 24, 1, False),    # local conv
    (1, 5, 3, 48, 0, 48, 1, False),
    (1, 6, 6, 129, 0, 20, 2, False),   # K and N not multiples of the blocks
    (2, 1, 1, 40, 0, 40, 1, False),
    (2, 7, 9, 24, 24, 24, 1, False),   # fusion conv over [x, x2]
    (1, 2, 3, 40, 40, 40, 1, False),
    (1, 5, 5, 48, 16, 48, 1, False),   # unequal halves still index the right weight rows
]


def case_id(c):
    B, H, W, c1, c2, cout, stride, nchw = c
    cin = f"C{c1}+{c2}" if c2 else f"C{c1}"
    return f"B{B}-H{H}W{W}-{cin}-O{cout}-s{stride}" + ("-nchw" if nchw else "")


def make(B, H, W, c1, c2, cout, nchw, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (B, c1, H, W) if nchw else (B, H, W, c1)
    x = torch.randn(shape, generator=g).to(DEVICE, dtype)
    x2 = torch.randn(B, H, W, c2, generator=g).to(DEVICE, dtype) if c2 else None
    weight = torch.randn(cout, c1 + c2, 3, 3, generator=g) / (9 * (c1 + c2)) ** 0.5
    w, b = pack_conv3x3(weight, torch.randn(cout, generator=g) * 0.1, dtype)
    return x, x2, w.to(DEVICE), b.to(DEVICE)


def check(x, w, b, out, what, **kw):
    x2 = kw.pop("x2", None)
    ref64 = conv3x3_reference(x.double(), w.double(), b.double(), x2=None if x2 is None else x2.double(), **kw)
    assert_within_torch_error(out, ref64, conv3x3_reference(x, w, b, x2=x2, **kw), what)


def run_poisoned(x, x2, w, b, stride, nchw, act=True):
    """The launcher into a NaN-filled output (the op allocates its own)."""
    B, C, H, W = x.shape if nchw else (x.shape[0], x.shape[3], x.shape[1], x.shape[2])
    s = x.stride()
    strides = (s[0], s[2], s[3], s[1]) if nchw else tuple(s)
    y = poison(x.new_empty((B, out_size(H, stride), out_size(W, stride), w.shape[1])))
    return K.conv3x3_launch(x, strides, H, W, C, x2, w, b, y, stride, act)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_conv3x3(case, dtype):
    B, H, W, c1, c2, cout, stride, nchw = case
    x, x2, w, b = make(B, H, W, c1, c2, cout, nchw, dtype)
    out = run_poisoned(x, x2, w, b, stride, nchw)
    check(x, w, b, out, f"{case_id(case)}-{dtype_id(dtype)}", stride=stride, act=True, x2=x2, input_nchw=nchw)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_op_variants(dtype):
    """Through fastmvit::conv3x3: no activation; a wide NCHW input (made NHWC once); a channel-sliced x2."""
    x, _, w, b = make(1, 5, 4, 24, 0, 16, False, dtype)
    check(x, w, b, conv3x3(x, w, b, stride=1, act=False), "act=False", stride=1, act=False)
    xn = x.permute(0, 3, 1, 2).contiguous()
    check(xn, w, b, conv3x3(xn, w, b, stride=2, act=True, input_nchw=True), "wide NCHW", stride=2, act=True,
          input_nchw=True)
    x, x2, w, b = make(1, 5, 4, 24, 24, 24, False, dtype, seed=1)
    x2s = torch.cat([x2, x2[..., :8]], dim=-1)[..., :24]  # pixel stride 32 != 24 channels
    check(x, w, b, conv3x3(x, w, b, stride=1, act=True, x2=x2s), "strided x2", stride=1, act=True, x2=x2s)


def test_stem_reads_model_input_in_place():
    """The stem takes the model's NCHW image tensor, including a non-contiguous view of one."""
    g = torch.Generator().manual_seed(5)
    images = torch.rand(2, 3, 9, 11, generator=g).to(DEVICE)
    view = torch.rand(2, 3, 9, 22, generator=g).to(DEVICE)[..., ::2]
    _, _, w, b = make(1, 1, 1, 3, 0, 16, True, torch.float32)
    for x in (images, view):
        out = run_poisoned(x, None, w, b, 2, True)
        check(x, w, b, out, "stem", stride=2, act=True, input_nchw=True)


def test_pack_matches_module():
    """pack_conv3x3 + reference == nn.Conv2d, including the fusion conv's channel order [x, x2]."""
    conv = torch.nn.Conv2d(16, 8, 3, padding=1)
    w, b = pack_conv3x3(conv.weight, conv.bias, torch.float32)
    x, x2 = torch.randn(1, 5, 6, 10), torch.randn(1, 5, 6, 6)
    expect = conv(torch.cat([x, x2], -1).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    torch.testing.assert_close(conv3x3_reference(x, w, b, stride=1, act=False, x2=x2), expect)


def test_bad_arguments_raise_clearly():
    x, x2, w, b = make(1, 4, 4, 16, 16, 16, False, torch.float32)
    with pytest.raises(ValueError, match=r"9 \* 32"):
        conv3x3(x, w[:16 * 9], b, stride=1, act=True, x2=x2)
    with pytest.raises(ValueError, match="x2 must match"):
        conv3x3(x, w, b, stride=1, act=True, x2=x2[:, :3])
    with pytest.raises(ValueError, match="float16"):
        conv3x3(x.half(), w, b, stride=1, act=True, x2=x2.half())
    with pytest.raises(ValueError, match="stride"):
        conv3x3(x, w, b, stride=3, act=True, x2=x2)


def test_gradient_request_raises():
    x, _, w, b = make(1, 3, 3, 16, 0, 16, False, torch.float32)
    with pytest.raises(RuntimeError, match="inference-only"):
        conv3x3(x, w.requires_grad_(), b, stride=1, act=True)


def test_op_registration():
    x, x2, w, b = make(1, 3, 4, 16, 16, 16, False, torch.float32)
    torch.library.opcheck(torch.ops.fastmvit.conv3x3.default, (x, w, b, x2),
                          {"stride": 1, "act": "silu", "input_nchw": False},
                          test_utils=("test_schema", "test_autograd_registration"))


@needs_gpu
def test_opcheck_full():
    x, x2, w, b = make(2, 8, 8, 48, 48, 48, False, torch.float16)
    torch.library.opcheck(torch.ops.fastmvit.conv3x3.default, (x, w, b, x2),
                          {"stride": 1, "act": "silu", "input_nchw": False})


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", [(8, 256, 256, 3, 0, 16, 2, True), (4, 224, 224, 3, 0, 64, 2, True),
                                  (16, 32, 32, 96, 0, 96, 1, False), (16, 8, 8, 160, 160, 160, 1, False),
                                  (64, 7, 7, 80, 80, 80, 1, False)], ids=case_id)
def test_conv3x3_full_size(case, dtype):
    B, H, W, c1, c2, cout, stride, nchw = case
    x, x2, w, b = make(B, H, W, c1, c2, cout, nchw, dtype)
    out = run_poisoned(x, x2, w, b, stride, nchw)
    check(x, w, b, out, f"{case_id(case)}-{dtype_id(dtype)}", stride=stride, act=True, x2=x2, input_nchw=nchw)


def test_launch_rule():
    """The tile rule: no ragged K tail for the model's widths, Cout padding at most 25 % where possible."""
    assert K._block_n(48) == 64 and K._block_n(80) == 32 and K._block_n(96) == 128 and K._block_n(160) == 64
    for kind, c1, c2, cout, stride, pixels in K.conv3x3_uses():
        bm, bn, bk, warps, stages = K.conv3x3_config(c1, c2, cout, 256 * pixels, torch.float16, kind == "stem",
                                                     interpret=False)
        if kind != "stem":
            assert c1 % bk == 0 and c2 % bk == 0, (kind, c1, c2, bk)
        assert bm * bk * 2 <= 16384 and bn >= 16


# --------------------------------------------------------------------------------------------------
# sm_90 compile check
# --------------------------------------------------------------------------------------------------

def test_compiles_for_sm90_without_spills():
    """Representative specialisations (all of them: ``python -m fastmvit.kernels check``): tensor-core
    (wgmma) dots for 16-bit, none for float32's exact dots, no spills."""
    cfgs = K.compile_configs()
    pick = [next(c.name for c in cfgs if f"-{kind}-" in c.name and c.name.endswith(dt))
            for kind, dt in (("fusion", "fp16"), ("stem", "bf16"), ("local", "fp32"))]
    for use in compiled_resources(K.__name__, pick):
        assert use["stack"] == 0, use
        assert (use["wgmma"] > 0) == (not use["name"].endswith("fp32")), use


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("c2", [0, 32], ids=["local", "fusion"])
def test_small_tiles_cover_ragged_edges(monkeypatch, dtype, c2):
    """Force 16-wide tiles so the grid has several pixel tiles and output-channel tiles (both ragged:
    35 pixels, 40 channels) and the K loop several (tap, chunk) steps per input."""
    monkeypatch.setattr(K, "conv3x3_config", lambda *a, **k: (16, 16, 16, 4, 1))
    x, x2, w, b = make(1, 5, 7, 32, c2, 40, False, dtype)
    out = run_poisoned(x, x2, w, b, 1, False)
    check(x, w, b, out, f"small-tiles-{dtype_id(dtype)}", stride=1, act=True, x2=x2, input_nchw=False)


# --------------------------------------------------------------------------------------------------
# dilation and ReLU: DeepLabV3's atrous ASPP branches
# --------------------------------------------------------------------------------------------------

# (B, H, W, C, Cout, dilation): rates larger than the map (only the centre tap lands), a map narrower
# than the tap span in one direction only, ragged K and N
DILATED = [
    (2, 7, 9, 24, 40, 2),
    (2, 5, 11, 48, 20, 3),
    (1, 9, 6, 129, 24, 4),
    (2, 4, 5, 32, 48, 6),
    (1, 13, 14, 16, 16, 12),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", DILATED, ids=lambda c: "B{}-H{}W{}-C{}-O{}-d{}".format(*c))
def test_dilated_relu(case, dtype):
    """padding = dilation, the taps ``dilation`` apart, then ReLU: one compiled kernel for every rate."""
    B, H, W, C, cout, d = case
    x, _, w, b = make(B, H, W, C, 0, cout, False, dtype, seed=d)
    y = poison(x.new_empty((B, H, W, cout)))
    out = K.conv3x3_launch(x, tuple(x.stride()), H, W, C, None, w, b, y, 1, "relu", dilation=d)
    check(x, w, b, out, f"dilated-{case}-{dtype_id(dtype)}", stride=1, act="relu", dilation=d)
    assert (out >= 0).all() and (out == 0).any() and (out > 0).any()  # the ReLU, not SiLU or none


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_dilated_op_and_small_tiles(monkeypatch, dtype):
    """Through fastmvit::conv3x3 with dilation, forced 16-wide tiles (several pixel, channel and K tiles),
    and the stem's gathered K layout (FLAT_K) dilated too."""
    x, _, w, b = make(2, 6, 7, 32, 0, 40, False, dtype)
    check(x, w, b, conv3x3(x, w, b, stride=1, act="relu", dilation=2), "op d2", stride=1, act="relu", dilation=2)
    xs, _, ws, bs = make(2, 9, 8, 3, 0, 16, True, dtype)
    check(xs, ws, bs, conv3x3(xs, ws, bs, stride=2, act=True, input_nchw=True, dilation=2), "flat d2", stride=2,
          act=True, input_nchw=True, dilation=2)
    monkeypatch.setattr(K, "conv3x3_config", lambda *a, **k: (16, 16, 16, 4, 1))
    check(x, w, b, conv3x3(x, w, b, stride=1, act="relu", dilation=3), "small tiles d3", stride=1, act="relu",
          dilation=3)


def test_reference_matches_a_dilated_conv_module():
    """The reference itself: pack + conv3x3_reference == nn.Conv2d(dilation=d, padding=d) + ReLU."""
    conv = torch.nn.Conv2d(8, 12, 3, padding=5, dilation=5)
    x = torch.randn(2, 11, 9, 8)
    w, b = pack_conv3x3(conv.weight, conv.bias, torch.float32)
    expect = torch.relu(conv(x.permute(0, 3, 1, 2))).permute(0, 2, 3, 1)
    torch.testing.assert_close(conv3x3_reference(x, w, b, stride=1, act="relu", dilation=5), expect)


def test_bad_dilation_and_act_are_refused():
    x, _, w, b = make(1, 4, 4, 8, 0, 8, False, torch.float32)
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="dilation"):
            conv3x3(x, w, b, stride=1, act=True, dilation=bad)
    with pytest.raises(ValueError, match="act"):
        conv3x3(x, w, b, stride=1, act="gelu")
