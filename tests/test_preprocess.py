"""Preprocessing against Hugging Face's MobileViTImageProcessor on real image files, image decoding errors,
class names and top-k."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from fastmvit import InputError, PreprocessConfig, imagenet_classes, load_image, preprocess, topk

from .utils import photo

SIZES = [(320, 240), (200, 300), (256, 256), (501, 333), (281, 199)]  # (width, height)


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    files = []
    for i, (w, h) in enumerate(SIZES):
        path = root / f"img{i}.{'jpg' if i % 2 == 0 else 'png'}"
        photo(w, h, i).save(path, quality=90) if path.suffix == ".jpg" else photo(w, h, i).save(path)
        files.append(path)
    return files


def _hf_processor(cfg: PreprocessConfig):
    image_processing = pytest.importorskip("transformers.models.mobilevit.image_processing_pil_mobilevit")
    from transformers.image_utils import PILImageResampling

    return image_processing.MobileViTImageProcessorPil(
        size={"shortest_edge": cfg.resize}, crop_size={"height": cfg.input_size, "width": cfg.input_size},
        resample=PILImageResampling.BILINEAR if cfg.interpolation == "bilinear" else PILImageResampling.BICUBIC,
        do_flip_channel_order=cfg.channel_order == "BGR")


@pytest.mark.parametrize("cfg", [
    PreprocessConfig(256, 288, "bilinear", "BGR", "floor"),   # Apple's hub preprocessor_config.json
    PreprocessConfig(256, 288, "bicubic", "RGB", "floor"),
    PreprocessConfig(224, 256, "bilinear", "BGR", "floor"),
    PreprocessConfig(512, 544, "bilinear", "BGR", "floor"),   # Apple's DeepLabV3 hub preprocessor_config.json
], ids=["hub-v1", "rgb-bicubic", "224", "hub-deeplabv3"])
def test_matches_hugging_face_processor(image_files, cfg):
    processor = _hf_processor(cfg)
    for path in image_files:
        with Image.open(path) as img:
            expected = processor(img.convert("RGB"), return_tensors="pt")["pixel_values"][0]
        got = preprocess(path, cfg)
        assert got.dtype == torch.float32 and got.shape == (3, cfg.input_size, cfg.input_size)
        torch.testing.assert_close(got, expected, rtol=0, atol=0, msg=str(path))


def test_batch_and_channel_order(image_files):
    rgb = preprocess(list(image_files[:2]), PreprocessConfig(channel_order="RGB"))
    bgr = preprocess(list(image_files[:2]), PreprocessConfig(channel_order="BGR"))
    assert rgb.shape == (2, 3, 256, 256)
    torch.testing.assert_close(bgr, rgb.flip(1), rtol=0, atol=0)
    assert 0.0 <= rgb.min() and rgb.max() <= 1.0


def test_crop_rounding_follows_torchvision():
    """torchvision's (timm's) centre crop rounds the offset, HF's floors it: a 435-wide margin of 179
    starts at round(89.5) = 90 in one and 89 in the other."""
    img = photo(435, 288, 5)
    a = preprocess(img, PreprocessConfig(crop_rounding="round"))
    b = preprocess(img, PreprocessConfig(crop_rounding="floor"))
    torch.testing.assert_close(a[..., :-1], b[..., 1:], rtol=0, atol=0)
    assert not torch.equal(a, b)


def test_hf_processor_config_is_read():
    cfg = PreprocessConfig.from_hf_processor({"crop_size": {"height": 512, "width": 512}, "resample": 2,
                                              "size": {"shortest_edge": 544}, "do_flip_channel_order": True})
    assert cfg == PreprocessConfig(512, 544, "bilinear", "BGR", "floor")


# ---- decoding ----------------------------------------------------------------------------------

def _jpeg_bytes(w=64, h=48):
    buf = io.BytesIO()
    photo(w, h, 0).save(buf, format="JPEG")
    return buf.getvalue()


def test_load_image_accepts_bytes_paths_arrays(image_files):
    assert load_image(_jpeg_bytes()).size == (64, 48)
    assert load_image(image_files[1]).mode == "RGB"
    assert load_image(np.zeros((5, 7, 3), np.uint8)).size == (7, 5)
    gray = io.BytesIO()
    Image.new("L", (9, 9), 128).save(gray, format="PNG")
    assert load_image(gray.getvalue()).mode == "RGB"


@pytest.mark.parametrize("data,match,reason", [
    (b"", "empty image data", "empty"),
    (b"this is not an image at all", "is not an image in a format Pillow can read", "not_an_image"),
    (_jpeg_bytes()[:300], "could not be decoded \\(truncated or corrupt\\)", "corrupt"),
])
def test_bad_image_data(data, match, reason):
    with pytest.raises(InputError, match=match) as err:
        load_image(data)
    assert err.value.reason == reason


def test_too_small_and_too_large_images():
    tiny = io.BytesIO()
    Image.new("RGB", (1, 1)).save(tiny, format="PNG")
    with pytest.raises(InputError, match="image of 1x1 is too small; each side needs at least 8 pixels") as err:
        load_image(tiny.getvalue(), min_side=8)
    assert err.value.reason == "too_small"
    with pytest.raises(InputError, match="image of 64x48 pixels exceeds the limit of 1000 pixels") as err:
        load_image(_jpeg_bytes(), max_pixels=1000)
    assert err.value.reason == "too_large"


def test_decompression_bomb_is_refused_before_decoding():
    """A PNG that declares 40000x40000 pixels in a few hundred bytes."""
    buf = io.BytesIO()
    Image.new("1", (40000, 40000)).save(buf, format="PNG")
    assert len(buf.getvalue()) < 300_000
    with pytest.raises(InputError, match="(decompression bomb|exceeds the limit)") as err:
        load_image(buf.getvalue())
    assert err.value.reason == "too_large"
    # Pillow refuses it on its own (over twice its limit): the message quotes the limit the caller set
    with pytest.raises(InputError, match=r"image of 1600000000 pixels exceeds the limit of 40000000 pixels "
                                         r"\(a decompression bomb") as err:
        load_image(buf.getvalue(), max_pixels=40_000_000)
    assert "178956970" not in str(err.value) and err.value.reason == "too_large"


def test_directory_is_not_an_image(tmp_path):
    with pytest.raises(InputError, match="is a directory, not an image file"):
        load_image(tmp_path)


def test_not_a_file():
    with pytest.raises(InputError, match="no such image file"):
        load_image("/nonexistent/cat.jpg")


# ---- labels ------------------------------------------------------------------------------------

def test_imagenet_classes():
    names = imagenet_classes()
    assert len(names) == 1000 and len(set(names)) >= 998  # two WordNet lemmas repeat ("crane", "maillot")
    assert names[0] == "tench, Tinca tinca" and names[281] == "tabby, tabby cat" and names[999].startswith("toilet")


def test_topk():
    logits = torch.full((2, 1000), -10.0)
    logits[0, 281] = 5.0
    logits[1, 3] = 4.0
    logits[1, 0] = 3.0
    top = topk(logits, k=2)
    assert [t["index"] for t in top[0]] == [281, top[0][1]["index"]]
    assert top[0][0]["label"] == "tabby, tabby cat" and top[0][0]["score"] > 0.9
    assert [t["index"] for t in top[1]] == [3, 0]
    assert topk(torch.zeros(1, 3), k=5, labels=["a", "b", "c"])[0][0]["label"] in "abc"
    with pytest.raises(InputError):
        topk(torch.zeros(1000))
