"""End to end against timm, every variant: a timm state dict saved as safetensors loads into fastmvit and
gives timm's logits, bit for bit with timm's fused attention off (timm's manual path is ml-cvnets'
arithmetic), within float rounding with it on (timm's default, F.scaled_dot_product_attention); at sizes
whose v1 and v2 stage maps are odd (ml-cvnets/timm resize there); the fused engine too; and timm's own
preprocessing (resolve_data_config + create_transform) against fastmvit's on real image files.

In CI timm imports through tests/torchvision_standin.py (torchvision's Python sources without its C++
library, which no wheel here loads); the module is skipped only where timm is not installed at all."""
import copy
import math

import numpy as np
import pytest
import torch

import fastmvit
from fastmvit.variants import VARIANTS

from .utils import FACTOR, photo, REL_FLOOR, assert_images_apart, image_sensitive_, max_err, randomize_, varied_images

timm = pytest.importorskip("timm", reason="timm is not installed: run .ci/setup_timm.sh")
safetensors_torch = pytest.importorskip("safetensors.torch")

# 128x128: every stage map even. 96x80: stage maps 48x40, 24x20, 12x10, 6x5, 3x3, so v1 resizes around
# its last two transformers and v2 enlarges its last two block inputs (align_corners=True) and keeps them.
# (Not 64x64: there v1 xs/s differ from timm by 1-4 float32 ulps in the 2x2 last stage, where torch's
# matmuls over single-patch sequences round differently in the two layouts; exact at 96x80, 128, 256.)
EVEN, ODD = (128, 128), (96, 80)


def _timm_model(variant, fused: bool):
    from timm.layers import set_fused_attn

    set_fused_attn(fused)  # read when the model is built
    try:
        return timm.create_model(variant.timm_name).eval()
    finally:
        set_fused_attn(True)


def _float_rounding_bound(ref, x, ref32):
    """FACTOR x timm's own float32 error against timm in float64, plus a few ulps of the largest logit:
    how far two float32 computations of the same function may honestly differ. Also returns the float64
    logits."""
    with torch.inference_mode():
        ref64 = copy.deepcopy(ref).double()(x.double())
    return FACTOR * max_err(ref32, ref64) + REL_FLOOR[torch.float32] * ref64.abs().max().item(), ref64


@pytest.mark.parametrize("name", list(VARIANTS))
def test_logits_match_timm(name, tmp_path):
    variant = VARIANTS[name]
    exact = image_sensitive_(_timm_model(variant, fused=False), seed=7)
    fused = _timm_model(variant, fused=True)
    fused.load_state_dict(exact.state_dict())
    path = tmp_path / "model.safetensors"
    safetensors_torch.save_file({k: v.contiguous() for k, v in exact.state_dict().items()}, str(path))
    model = fastmvit.load(name, weights=path)
    assert model.pretrained_cfg["source_format"] == "timm"
    for size in (EVEN, ODD):
        x = varied_images((2, 3, *size))
        with torch.inference_mode():
            got, expected = model(x), exact(x)
            torch.testing.assert_close(got, expected, rtol=0, atol=0, msg=f"{size}")
            assert max_err(got[0], got[1]) > 0.1  # logits of about unit size that differ between the images
            if size == EVEN:  # timm's default attention (SDPA): the same function, rounded differently
                bound, _ = _float_rounding_bound(exact, x, expected)
                assert max_err(got, fused(x)) <= bound


@pytest.mark.parametrize("name", ["xxs", "v2-0.5", "v2-1.25"])
def test_odd_size_semantics_against_timm(name):
    """At odd stage maps timm (and ml-cvnets) resize; Hugging Face's v2 drops a row and column instead.
    fastmvit's default follows timm bit for bit; numerics='hf' must give a clearly different answer for v2
    (so this test would notice the default sliding to the other behaviour), and the same answer for v1
    up to the attention-scale rounding (v1 has only one odd-size behaviour)."""
    variant = VARIANTS[name]
    ref = image_sensitive_(_timm_model(variant, fused=False), size=ODD[0], seed=8)
    state = ref.state_dict()
    x = varied_images((2, 3, *ODD), seed=3)
    with torch.inference_mode():
        expected = ref(x)
        default = fastmvit.load(name, weights=state)(x)
        hf = fastmvit.load(name, weights=state, numerics="hf")(x)
    torch.testing.assert_close(default, expected, rtol=0, atol=0)
    bound, _ = _float_rounding_bound(ref, x, expected)
    if variant.family == "v2":
        assert max_err(hf, expected) > 10 * bound and max_err(hf, expected) > 0.1
    else:
        assert max_err(hf, expected) <= bound


@pytest.mark.parametrize("name", ["xxs", "v2-0.5"])
def test_fused_engine_matches_timm_at_odd_sizes(name):
    """The engine (Triton kernels, interpreted on the CPU) against timm itself, on weights whose logits tell
    images apart: within FACTOR x timm's own float32 error against timm in float64, plus a floor."""
    variant = VARIANTS[name]
    state = image_sensitive_(fastmvit.load(name, pretrained=False, backend="torch"), size=ODD[0], seed=9).state_dict()
    ref = _timm_model(variant, fused=False)
    ref.load_state_dict(state)
    x = varied_images((2, 3, *ODD), seed=4)
    engine = fastmvit.load(name, weights=state, backend="triton")
    with torch.inference_mode():
        got = engine(x)
        ref32 = ref(x)
        ref64 = ref.double()(x.double())
    bound = FACTOR * max_err(ref32, ref64) + REL_FLOOR[torch.float32] * ref64.abs().max().item()
    assert max_err(got, ref64) <= bound, (max_err(got, ref64), bound)
    assert_images_apart(ref64, bound, name)


@pytest.mark.parametrize("name", ["s", "v2-1.0"])
def test_stage_features_match_timm_intermediates(name):
    """timm's features_only maps are the stage outputs, except that for v1 its last one is taken after the
    1x1 expansion (final_conv): fastmvit's forward_stages + final_conv on the last reproduces them."""
    ref = randomize_(_timm_model(VARIANTS[name], fused=False), seed=7)
    model = fastmvit.load(name, weights=ref.state_dict())
    x = varied_images((1, 3, *ODD))
    with torch.inference_mode():
        expected = ref.forward_intermediates(x, intermediates_only=True)
        got = model.forward_stages(x)
        got[-1] = model.final_conv(got[-1])
    assert len(expected) == len(got) == 5
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


# ---- preprocessing: timm's own transforms on real image files ---------------------------------------

# (width, height): awkward sizes, portrait and landscape, chosen so that after the resize some crop
# margins are odd with an even half-pixel start (round-half-even keeps it: ceil would not) and some
# with an odd one (round moves up: floor would not). The test checks that both kinds occur.
PHOTO_SIZES = [(435, 288), (281, 199), (199, 281), (301, 257), (284, 200), (257, 290), (500, 333)]


@pytest.fixture(scope="module")
def photo_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    files = []
    for i, (w, h) in enumerate(PHOTO_SIZES):
        path = root / f"img{i}.{'jpg' if i % 2 else 'png'}"
        photo(w, h, i).save(path, **({"quality": 90} if path.suffix == ".jpg" else {}))
        files.append(path)
    return files


def _crop_margins(size, resize, crop):
    w, h = size
    short, long = min(w, h), max(w, h)
    return [resize - crop, int(resize * long / short) - crop]


@pytest.mark.parametrize("name", ["xs", "v2-0.75"])  # timm's crop_pct: 0.9 for v1, 0.888 for v2
def test_preprocessing_matches_timm_transforms(name, photo_files):
    """The preprocessing fastmvit attaches to a timm checkpoint against timm's resolve_data_config +
    create_transform (torchvision's PIL transforms: Resize, CenterCrop, ToTensor) on the same files."""
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    variant = VARIANTS[name]
    ref = _timm_model(variant, fused=True)
    data_config = resolve_data_config({}, model=ref)
    transform = create_transform(**data_config)
    model = fastmvit.load(name, weights=ref.state_dict())
    cfg = model.pretrained_cfg["preprocess"]
    assert (cfg.input_size, cfg.channel_order) == (data_config["input_size"][1], "RGB")
    assert tuple(data_config["mean"]) == (0, 0, 0) and tuple(data_config["std"]) == (1, 1, 1)
    assert cfg.resize == math.floor(cfg.input_size / data_config["crop_pct"])
    halves = {m % 4 for s in PHOTO_SIZES for m in _crop_margins(s, cfg.resize, cfg.input_size)}
    assert {1, 3} <= halves, "the sizes no longer give both kinds of odd crop margin"
    for path in photo_files:
        with Image.open(path) as img:
            expected = transform(img.convert("RGB"))
        got = fastmvit.preprocess(path, cfg)
        assert got.shape == expected.shape
        # torchvision divides by 255 in float32, fastmvit scales in float64 then rounds: <= 1 unit in the
        # last place of values in [0, 1]; a pixel's shift or a different filter is ~1e-2 and more.
        torch.testing.assert_close(got, expected, rtol=0, atol=1.2e-7, msg=str(path))
