"""MobileViT + DeepLabV3 end to end against Hugging Face transformers' MobileViT[V2]ForSemanticSegmentation:
random weights with random BatchNorm statistics written by ``save_pretrained``, loaded by ``fastmvit.load``
and compared on the same input. Every variant at a cheap size; output strides 8/16/32, 512x512 and an odd
size for the two smallest (one v1, one v2)."""
import zlib

import pytest
import torch

import fastmvit
from fastmvit.model.segmentation import DeepLabV3, stage_dilations
from fastmvit.variants import VARIANTS

from .utils import hf_segmentation_model, images, randomize_

pytest.importorskip("transformers")

ATOL = 1e-4  # the bound asked for float32 logits; the arithmetic is HF's, so the difference is 0 in practice


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(HF model, its save_pretrained directory) per (variant, output stride), built once per module."""
    cache = {}

    def get(name, output_stride=16):
        if (name, output_stride) not in cache:
            hf = hf_segmentation_model(VARIANTS[name], output_stride=output_stride)
            randomize_(hf, seed=zlib.crc32(f"{name}-{output_stride}".encode()) % 1000)
            path = tmp_path_factory.mktemp(f"seg-{name.replace('.', '_')}-os{output_stride}")
            hf.save_pretrained(path)
            cache[name, output_stride] = hf, path
        return cache[name, output_stride]

    return get


def _compare(hf, model, x):
    with torch.inference_mode():
        expected = hf(x).logits
        got = model(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_variant_matches_hf_at_output_stride_16(name, saved):
    hf, path = saved(name)
    model = fastmvit.load(f"deeplabv3-{name}", weights=path)
    assert isinstance(model, DeepLabV3) and model.variant.name == name and model.output_stride == 16
    assert model.pretrained_cfg["source_format"] == "hf" and model.num_classes == 21
    _compare(hf, model, images((2, 3, 96, 128)))  # logits [2, 21, 6, 8]


@pytest.mark.parametrize("output_stride", [8, 32])
@pytest.mark.parametrize("name", ["xxs", "v2-0.5"])
def test_output_strides_8_and_32_match_hf(name, output_stride, saved):
    hf, path = saved(name, output_stride)
    model = fastmvit.load(f"deeplabv3-{name}", weights=path)
    assert model.output_stride == output_stride  # read from config.json
    _compare(hf, model, images((1, 3, 128, 160)))


@pytest.mark.parametrize("name", ["xxs", "v2-0.5"])
def test_512_and_odd_size_match_hf(name, saved):
    """512x512 as the published checkpoints run; 200x264 makes the stage-3 map 25x33 (odd: v1 resizes around
    its transformer, HF's v2 drops and zero-fills a row and a column)."""
    hf, path = saved(name)
    model = fastmvit.load(f"deeplabv3-{name}", weights=path)
    _compare(hf, model, images((1, 3, 512, 512)))
    _compare(hf, model, images((1, 3, 200, 264), seed=2))


def test_upsampled_logits_are_hf_post_processing(saved):
    """``upsample=True`` resizes to the input like HF's loss and post-processing (bilinear, align_corners=False)."""
    hf, path = saved("xxs")
    model = fastmvit.load("deeplabv3-xxs", weights=path)
    x = images((1, 3, 96, 112))
    with torch.inference_mode():
        expected = torch.nn.functional.interpolate(hf(x).logits, size=(96, 112), mode="bilinear",
                                                   align_corners=False)
        got = model(x, upsample=True)
    assert got.shape == (1, 21, 96, 112)
    torch.testing.assert_close(got, expected, rtol=0, atol=ATOL)


def test_v2_local_conv_dilation_follows_numerics(saved):
    """ml-cvnets dilates the v2 block's depthwise 3x3 in dilated stages, HF does not (mobilevit.md D5). The
    reference for ml-cvnets' arithmetic is HF's model with that conv dilated like its stage; at 128x128 every
    stage map is even, so the other HF/ml-cvnets difference (odd maps) does not enter."""
    hf, path = saved("v2-0.5", 8)
    x = images((1, 3, 128, 128))
    cvnets = fastmvit.load("deeplabv3-v2-0.5", weights=path, numerics="cvnets")
    with torch.inference_mode():
        undilated = hf(x).logits
        for layer, (_, dilation) in zip(hf.mobilevitv2.encoder.layer[2:], stage_dilations(8)[2:]):
            conv = layer.conv_kxk.convolution
            conv.dilation, conv.padding = (dilation, dilation), (dilation, dilation)
        try:
            dilated = hf(x).logits
        finally:
            for layer in hf.mobilevitv2.encoder.layer[2:]:
                layer.conv_kxk.convolution.dilation, layer.conv_kxk.convolution.padding = (1, 1), (1, 1)
        got = cvnets(x)
    assert (dilated - undilated).abs().max() > 1e-2  # the switch matters at output stride 8
    torch.testing.assert_close(got, dilated, rtol=0, atol=ATOL)


def test_stage_dilations():
    assert stage_dilations(32) == ((1, 1), (2, 1), (2, 1), (2, 1), (2, 1))
    assert stage_dilations(16) == ((1, 1), (2, 1), (2, 1), (2, 1), (1, 2))
    assert stage_dilations(8) == ((1, 1), (2, 1), (2, 1), (1, 2), (1, 4))
