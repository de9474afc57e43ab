"""fastmvit::dwconv3x3 (Triton) against its PyTorch reference at awkward shapes."""
import pytest
import torch

from fastmvit.kernels import dwconv as K
from fastmvit.ops.dwconv import dwconv3x3, dwconv3x3_reference, pack_dwconv3x3

from .common import DEVICE, DTYPES, assert_within_torch_error, dtype_id, needs_gpu, poison

# (B, H, W, C, stride, dilation): odd and non-square maps, 1x1 and 2x3 maps, C not a multiple of the
# channel block or of the 16-byte vector (24, 40, 129), C over one interpreter block (300).
SHAPES = [
    (2, 7, 9, 24, 1, 1),
    (2, 7, 9, 24, 2, 1),
    (1, 7, 9, 129, 2, 2),
    (1, 9, 7, 129, 1, 2),
    (1, 1, 1, 16, 1, 1),
    (2, 1, 1, 16, 2, 2),
    (2, 2, 3, 40, 1, 2),
    (1, 2, 3, 40, 2, 1),
    (1, 3, 5, 300, 2, 1),
    # dilation 4 (output stride 8): maps smaller than the 9-pixel span (only the centre tap is inside),
    # spans that just fit, stride 2 with dilation, batch 2
    (2, 3, 5, 24, 1, 4),
    (2, 5, 3, 40, 2, 4),
    (2, 9, 11, 24, 1, 4),
    (1, 11, 9, 48, 2, 4),
    (2, 9, 7, 16, 2, 2),
]


def shape_id(s):
    B, H, W, C, stride, dil = s
    return f"B{B}-H{H}W{W}-C{C}-s{stride}-d{dil}"


def make(B, H, W, C, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, H, W, C, generator=g).to(DEVICE, dtype)
    w, b = pack_dwconv3x3(torch.randn(C, 1, 3, 3, generator=g) / 3, torch.randn(C, generator=g) * 0.1)
    return x, w.to(DEVICE), b.to(DEVICE)


def check(x, w, b, out, what, **kw):
    ref64 = dwconv3x3_reference(x.double(), w.double(), b.double(), **kw)
    assert_within_torch_error(out, ref64, dwconv3x3_reference(x, w, b, **kw), what)


def run_poisoned(x, w, b, **kw):
    """Launch into a NaN-filled output so an unwritten element fails the test."""
    B, H, W, C = x.shape
    y = poison(x.new_empty((B, K.out_size(H, kw["stride"]), K.out_size(W, kw["stride"]), C)))
    return K.dwconv3x3_launch(x, w, b, y, kw["stride"], kw["dilation"], kw["act"])


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_dwconv3x3(shape, dtype):
    B, H, W, C, stride, dil = shape
    x, w, b = make(B, H, W, C, dtype)
    kw = dict(stride=stride, dilation=dil, act=True)
    check(x, w, b, run_poisoned(x, w, b, **kw), f"{shape_id(shape)}-{dtype_id(dtype)}", **kw)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_no_activation_and_op(dtype):
    """act=False through the registered op (fastmvit::dwconv3x3), which allocates its own output."""
    x, w, b = make(2, 5, 6, 48, dtype)
    kw = dict(stride=1, dilation=1, act=False)
    y = dwconv3x3(x, w, b, **kw)
    assert y.is_contiguous() and y.dtype == dtype
    check(x, w, b, y, "act=False", **kw)


def test_strided_input_is_read_in_place():
    """A channel slice (pixel stride 30, not a multiple of the fp16 vector) is indexed in place; a
    tensor whose channels are not contiguous is copied first. Both must be right."""
    g = torch.Generator().manual_seed(3)
    big = torch.randn(2, 5, 7, 30, generator=g).to(DEVICE, torch.float16)
    x = big[..., 3:27]
    assert x.stride(-1) == 1 and not x.is_contiguous()
    _, w, b = make(1, 1, 1, 24, torch.float16)
    kw = dict(stride=2, dilation=1, act=True)
    check(x, w, b, run_poisoned(x, w, b, **kw), "channel slice", **kw)
    xt = x.contiguous().transpose(1, 2).contiguous().transpose(1, 2)  # same values, W-major storage
    check(xt, w, b, dwconv3x3(xt, w, b, **kw), "W-major storage", **kw)
    xc = x.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)       # channels strided: copied
    check(xc, w, b, dwconv3x3(xc, w, b, **kw), "NCHW storage", **kw)


def test_pack_matches_module_weights():
    """pack_dwconv3x3 + reference == nn.Conv2d(groups=C) on the unpacked weight."""
    conv = torch.nn.Conv2d(24, 24, 3, padding=1, groups=24)
    w, b = pack_dwconv3x3(conv.weight, conv.bias)
    x = torch.randn(1, 6, 5, 24)
    expect = conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    torch.testing.assert_close(dwconv3x3_reference(x, w, b, act=False), expect)


def test_bad_arguments_raise_clearly():
    x, w, b = make(1, 4, 4, 16, torch.float32)
    with pytest.raises(ValueError, match="stride and dilation"):
        dwconv3x3(x, w, b, stride=3)
    for dil in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="dilation an integer >= 1"):
            dwconv3x3(x, w, b, dilation=dil)
    with pytest.raises(ValueError, match=r"\[9, 16\]"):
        dwconv3x3(x, w[:, :8], b)
    with pytest.raises(ValueError, match="NHWC"):
        dwconv3x3(x[0], w, b)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        dwconv3x3(x.double(), w, b)


def test_gradient_request_raises():
    x, w, b = make(1, 3, 3, 16, torch.float32)
    with pytest.raises(RuntimeError, match="inference-only"):
        dwconv3x3(x.requires_grad_(), w, b)
    with torch.no_grad():
        dwconv3x3(x, w, b)


def test_op_registration():
    x, w, b = make(1, 3, 5, 24, torch.float32)
    torch.library.opcheck(torch.ops.fastmvit.dwconv3x3.default, (x, w, b),
                          {"stride": 2, "dilation": 1, "act": True},
                          test_utils=("test_schema", "test_autograd_registration"))


@needs_gpu
def test_opcheck_full():
    """Fake-tensor and AOT-dispatch checks: under the interpreter the kernel would run on fake tensors."""
    x, w, b = make(2, 9, 7, 64, torch.float16)
    torch.library.opcheck(torch.ops.fastmvit.dwconv3x3.default, (x, w, b), {"stride": 2, "dilation": 1, "act": True})


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", [(8, 128, 128, 32, 1, 1), (8, 64, 64, 256, 2, 1), (4, 33, 31, 1024, 1, 2),
                                   (256, 8, 8, 1536, 1, 1)], ids=shape_id)
def test_dwconv3x3_full_size(shape, dtype):
    B, H, W, C, stride, dil = shape
    x, w, b = make(B, H, W, C, dtype)
    kw = dict(stride=stride, dilation=dil, act=True)
    check(x, w, b, run_poisoned(x, w, b, **kw), f"{shape_id(shape)}-{dtype_id(dtype)}", **kw)


def test_compile_configs_cover_the_variants():
    """Every depthwise width of the ten variants (hidden 32 ... 1536, v2 block 128 ... 1024) is listed,
    at every stride and (v2) dilation the engine runs, in three dtypes."""
    shapes = K._depthwise_shapes()
    widths = {c for c, _, _ in shapes}
    assert {32, 48, 1536, 128, 1024} <= widths and all(c % 16 == 0 for c in widths)
    assert {(s, d) for _, s, d in shapes} == {(1, 1), (2, 1), (1, 2)}
    cfgs = K.compile_configs()
    assert all("dil" not in c.constexprs and c.signature["dil"] == "i32" for c in cfgs)  # one kernel, every dilation
    names = [c.name for c in cfgs]
    assert len(names) == len(set(names)) and all(any(n.endswith(d) for n in names) for d in ("fp32", "fp16", "bf16"))


@pytest.mark.parametrize("dil", [2, 4])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_small_tiles_cover_ragged_edges(monkeypatch, dtype, dil):
    """Under the interpreter the launch rule picks one tile per op; force 16x16 tiles so the grid has
    several pixel and channel tiles, each ragged at its end (40 pixels, 40 channels)."""
    monkeypatch.setattr(K, "dwconv_config", lambda C, M=0, interpret=None, elem_bytes=2: (16, 16, 4))
    x, w, b = make(2, 9, 7, 40, dtype)
    kw = dict(stride=2, dilation=dil, act=True)
    check(x, w, b, run_poisoned(x, w, b, **kw), f"small-tiles-{dtype_id(dtype)}", **kw)


def test_dilation_is_a_run_time_argument():
    """Dilations 1, 2 and 4 launch the same specialisation: same constexprs and launch options, the
    dilation among the scalars, and the kernel exempt from Triton's value-1 / 16-divisibility
    specialisation of integers (a dilation of 1 would otherwise compile a kernel of its own)."""
    from fastmvit.engine.warmup import _launch_of, unspecialised

    x = torch.empty(2, 9, 7, 64)
    plans = [K.dwconv3x3_plan(x, (2, 5, 4, 64), 2, d, True) for d in (1, 2, 4)]
    assert all(p.meta == plans[0].meta and p.grid == plans[0].grid for p in plans)
    assert [p.scalars[-1] for p in plans] == [1, 2, 4] and all(p.scalars[:-1] == plans[0].scalars[:-1] for p in plans)
    assert unspecialised(K._dwconv3x3_kernel) == ("dil",)
    # the warm-up merges them into one specialisation too
    launches = [_launch_of(p.kernel, (x, x, x, x, *p.scalars), p.meta) for p in plans]
    assert len(set(launches)) == 1, launches


def test_cuda_extension_routes_other_dilations_to_triton():
    """The CUDA C++ kernel is instantiated for dilation 1 and 2; dwconv3x3_cuda runs any other dilation on
    the Triton kernel (here on the CPU, where the extension is absent and calling it would raise)."""
    from fastmvit.ops import cuda_ext

    x, w, b = make(2, 5, 7, 24, torch.float32)
    kw = dict(stride=2, dilation=4, act=True)
    check(x, w, b, cuda_ext.dwconv3x3_cuda(x, w, b, **kw), "FASTMVIT_DWCONV=cuda, dilation 4", **kw)
    if not cuda_ext.available():
        with pytest.raises(RuntimeError, match="needs the CUDA extension"):
            cuda_ext.dwconv3x3_cuda(x, w, b, stride=1, dilation=2)
