"""Segmentation outputs: label maps against Hugging Face's post-processing, mask PNGs, overlays, and
``python -m fastmvit predict`` for a segmentation model."""
import io
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import fastmvit
from fastmvit import InputError
from fastmvit.masks import label_map, mask_png, overlay, voc_palette, write_masks


def test_label_map_is_hf_post_processing():
    image_processing = pytest.importorskip("transformers.models.mobilevit.image_processing_pil_mobilevit")
    logits = torch.randn(2, 21, 8, 10, generator=torch.Generator().manual_seed(0))
    processor = image_processing.MobileViTImageProcessorPil()
    sizes = [(61, 77), (61, 77)]
    expected = processor.post_process_semantic_segmentation(SimpleNamespace(logits=logits), target_sizes=sizes)
    got = label_map(logits, size=(61, 77))
    assert got.shape == (2, 61, 77) and got.dtype == torch.int64
    for g, e in zip(got, expected):
        e = e["segmentation"] if not isinstance(e, torch.Tensor) else e
        assert torch.equal(g, e)
    assert torch.equal(label_map(logits), logits.argmax(1))  # at the logits' own size
    with pytest.raises(InputError, match=r"logits \[B, num_classes, h, w\]"):
        label_map(logits[0])


def test_voc_palette_colours():
    p = voc_palette()
    assert p.shape == (256, 3) and p.dtype == np.uint8
    # background black, aeroplane dark red, bicycle dark green, person (15) pink, tvmonitor (20): VOC's own
    assert [tuple(p[i]) for i in (0, 1, 2, 15, 20)] == [(0, 0, 0), (128, 0, 0), (0, 128, 0), (192, 128, 128),
                                                          (0, 64, 128)]


def test_mask_png_holds_the_class_indices():
    labels = torch.randint(0, 21, (37, 53), generator=torch.Generator().manual_seed(1))
    img = Image.open(io.BytesIO(mask_png(labels)))
    assert img.format == "PNG" and img.mode == "P" and img.size == (53, 37)
    assert np.array_equal(np.array(img), labels.numpy())
    assert img.getpalette()[3:6] == [128, 0, 0]
    many = torch.arange(300 * 4).reshape(30, 40) % 300  # more classes than a palette holds: 16-bit grey
    img16 = Image.open(io.BytesIO(mask_png(many)))
    assert img16.mode.startswith("I") and np.array_equal(np.array(img16).astype(np.int64), many.numpy())
    with pytest.raises(InputError, match="one label map"):
        mask_png(labels[None])


def test_overlay_colours_only_the_classes():
    image = Image.new("RGB", (4, 3), (10, 20, 30))
    labels = np.zeros((3, 4), dtype=np.int64)
    labels[1, 2] = 1
    out = np.array(overlay(image, labels, alpha=0.5))
    assert out.shape == (3, 4, 3)
    assert tuple(out[0, 0]) == (10, 20, 30)              # background left as it is
    assert tuple(out[1, 2]) == (69, 10, 15)               # half way to aeroplane's (128, 0, 0)
    with pytest.raises(InputError, match="does not match the image"):
        overlay(image, labels[:2])


def test_write_masks_covers_the_whole_image(tmp_path):
    model = fastmvit.load("deeplabv3-xxs", pretrained=False)
    src = tmp_path / "photo.png"
    Image.new("RGB", (150, 100), "orange").save(src)
    ((mask_path, overlay_path),) = write_masks(model, [src], tmp_path / "out")
    assert mask_path == tmp_path / "out" / "photo_mask.png"
    assert Image.open(mask_path).size == Image.open(overlay_path).size == (150, 100)


def test_predict_cli_writes_mask_and_overlay(tmp_path):
    src = tmp_path / "street.jpg"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (120, 170, 3), dtype=np.uint8)).save(src)
    r = subprocess.run([sys.executable, "-m", "fastmvit", "predict", str(src), "--model", "deeplabv3-xxs",
                        "--random", "--device", "cpu", "--out-dir", str(tmp_path / "masks")],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    mask = Image.open(tmp_path / "masks" / "street_mask.png")
    assert mask.size == (170, 120)  # the input's size, not the network's
    assert Image.open(tmp_path / "masks" / "street_overlay.png").size == (170, 120)
    assert "classes:" in r.stdout and "%" in r.stdout


@pytest.mark.parametrize("order", ["BGR", "RGB"])
def test_whole_image_input_is_the_preprocessing_without_the_crop(order):
    """predict feeds the whole image (shorter side to the input size, no crop); its centre is exactly what
    fastmvit.preprocess (checked against HF's processor) gives for a crop of that size."""
    from fastmvit.masks import _whole_image

    rng = np.random.default_rng(2)
    img = Image.fromarray(rng.integers(0, 255, (100, 180, 3), dtype=np.uint8))
    cfg = fastmvit.PreprocessConfig(128, 128, "bilinear", order, "floor")
    whole = _whole_image(img, cfg)
    assert whole.shape == (3, 128, 230)
    torch.testing.assert_close(whole[:, :, 51:179], fastmvit.preprocess(img, cfg), rtol=0, atol=0)


@pytest.mark.parametrize("align_corners", [False, True])
def test_label_map_a_class_at_a_time_is_the_same(align_corners):
    """Above ``max_bytes`` the logits are resized one class at a time with a running maximum: the labels are
    those of resizing them all at once, bit for bit, at odd sizes, in a batch, whatever the label dtype."""
    g = torch.Generator().manual_seed(3)
    for shape, size in [((2, 21, 5, 7), (131, 97)), ((1, 150, 9, 4), (61, 200)), ((1, 3, 6, 6), (96, 96))]:
        logits = torch.randn(shape, generator=g)
        full = label_map(logits, size=size, align_corners=align_corners)
        chunked = label_map(logits, size=size, align_corners=align_corners, max_bytes=0)
        assert torch.equal(chunked, full) and chunked.dtype == torch.int64
        assert torch.equal(label_map(logits, size=size, align_corners=align_corners, max_bytes=0, dtype=torch.uint8),
                           full.to(torch.uint8))
    # ties keep the first class, as argmax does: classes 1 and 2 equal everywhere, above 0 and 3
    tied = torch.tensor([0.0, 2.0, 2.0, 1.0]).view(1, 4, 1, 1).expand(1, 4, 3, 3).contiguous()
    assert (label_map(tied, size=(20, 20), max_bytes=0) == 1).all()


def test_label_map_memory_is_bounded():
    """150 classes at 1000 x 800 would be 480 MB of resized logits at once; a class at a time stays near
    three planes of 3.2 MB."""

    logits = torch.randn(1, 150, 63, 50, generator=torch.Generator().manual_seed(0))
    assert label_map(logits, size=(1000, 800), dtype=torch.uint8).shape == (1, 1000, 800)
    # torch's CPU allocations are not seen by tracemalloc: count what interpolate is asked for instead
    sizes = []
    real = torch.nn.functional.interpolate

    def spy(x, *args, **kwargs):
        sizes.append(x.shape[1])
        return real(x, *args, **kwargs)

    import fastmvit.masks as masks
    masks.F.interpolate, saved = spy, masks.F.interpolate
    try:
        label_map(logits, size=(1000, 800), dtype=torch.uint8)
        label_map(logits[:, :2], size=(100, 80))
    finally:
        masks.F.interpolate = saved
    assert sizes == [1] * 150 + [2]  # one class per call when large, all at once when small
