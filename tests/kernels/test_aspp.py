"""fastmvit::pointwise (the DeepLabV3 head's 1x1 convs over up to four inputs) against its PyTorch reference:
the ASPP projection reading four branches side by side with a per-image bias, the 1x1 branch, the
classifier."""
import pytest
import torch

from fastmvit.kernels import aspp as K
from fastmvit.ops.aspp import pointwise, pointwise_plan, pointwise_reference
from fastmvit.ops.gemm import pack_linear

from .common import DEVICE, DTYPES, assert_within_torch_error, dtype_id

# (B, H, W, K, N, inputs, per-image bias, relu): odd maps, K and N off the tiles, 21 classes
CASES = [
    (2, 5, 7, 24, 40, 4, True, True),     # the projection
    (2, 3, 3, 48, 48, 4, True, True),
    (1, 6, 5, 40, 24, 3, True, True),
    (2, 7, 9, 80, 48, 1, False, True),    # the 1x1 branch
    (2, 4, 5, 48, 21, 1, False, False),   # the classifier
    (3, 1, 1, 16, 16, 2, True, False),
]


def case_id(c):
    B, H, W, K_, N, n, img, relu = c
    return f"B{B}-H{H}W{W}-K{K_}x{n}-N{N}" + ("-img" if img else "") + ("-relu" if relu else "")


def make(B, H, W, K_, N, n, img, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    # each input its own offset, so reading one branch twice or another's rows shows
    xs = [(torch.randn(B, H, W, K_, generator=g) + i).to(DEVICE, dtype) for i in range(n)]
    weight = torch.randn(N, n * K_, generator=g) / (n * K_) ** 0.5
    bias = torch.randn(N, generator=g) * 0.3
    image_bias = (torch.randn(B, N, generator=g) * 2).to(DEVICE) if img else None
    return xs, weight, bias, image_bias


def check(out, xs, weight, bias, image_bias, relu, what):
    ref64 = pointwise_reference([x.double() for x in xs], weight.double(), bias.double(),
                                image_bias=None if image_bias is None else image_bias.double(), relu=relu)
    same = pointwise_reference(xs, weight, bias, image_bias=image_bias, relu=relu)
    assert_within_torch_error(out, ref64, same, what)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_pointwise(case, dtype):
    B, H, W, K_, N, n, img, relu = case
    xs, weight, bias, image_bias = make(B, H, W, K_, N, n, img, dtype)
    packed = pack_linear(weight, bias, dtype=dtype, device=DEVICE)
    out = pointwise(*xs, packed=packed, image_bias=image_bias, relu=relu)
    assert out.shape == (B, H, W, N) and out.dtype == dtype
    check(out, xs, weight, bias, image_bias, relu, f"{case_id(case)}-{dtype_id(dtype)}")
    planned = pointwise_plan(*xs, packed=packed, image_bias=image_bias, relu=relu)(*xs, packed=packed,
                                                                                    image_bias=image_bias)
    torch.testing.assert_close(planned, out, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_small_tiles(monkeypatch, dtype):
    """Forced 16-wide tiles: several pixel, channel and K tiles per input, a pixel tile spanning two images
    (the per-image bias row must follow each pixel's image)."""
    monkeypatch.setattr(K, "pointwise_config", lambda *a, **k: (16, 16, 16, 4, 1))
    xs, weight, bias, image_bias = make(3, 3, 5, 40, 40, 4, True, dtype, seed=1)  # 15 pixels per image
    packed = pack_linear(weight, bias, dtype=dtype, device=DEVICE)
    out = pointwise(*xs, packed=packed, image_bias=image_bias, relu=True)
    check(out, xs, weight, bias, image_bias, True, f"small-tiles-{dtype_id(dtype)}")


def test_bad_input_is_refused():
    xs, weight, bias, image_bias = make(2, 3, 3, 16, 16, 2, True, torch.float32)
    packed = pack_linear(weight, bias, device=DEVICE)
    with pytest.raises(ValueError, match="1 to 4 inputs"):
        pointwise(*(xs * 3), packed=packed)
    with pytest.raises(ValueError, match="packed for 32"):
        pointwise(xs[0], packed=packed)
    with pytest.raises(ValueError, match="match the first"):
        pointwise(xs[0], xs[1][:, :2], packed=packed)
    with pytest.raises(ValueError, match="image_bias"):
        pointwise(*xs, packed=packed, image_bias=image_bias[:1])
    with pytest.raises(RuntimeError, match="inference-only"):
        pointwise(xs[0].requires_grad_(), xs[1], packed=packed)


def test_compile_uses_follow_the_default_head():
    """The compile check's head shapes are SegmentationConfig's defaults (Apple's checkpoints), and every
    kind (1x1 branch, projection, classifier) has a specialisation per dtype."""
    from fastmvit.model.segmentation import SegmentationConfig
    from fastmvit.variants import VARIANTS

    cfg = SegmentationConfig()
    assert {v.family: cfg.channels_for(v) for v in VARIANTS.values()} == K.ASPP_CHANNELS
    assert cfg.num_classes == K.VOC_CLASSES
    names = [c.name for c in K.compile_configs()]
    for kind in ("branch", "project", "classifier"):
        for dt in ("fp32", "fp16", "bf16"):
            assert any(n.startswith(f"pointwise-{kind}-") and n.endswith(dt) for n in names), (kind, dt)
