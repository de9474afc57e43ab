"""End to end against timm (skipped where timm cannot be imported, e.g. a CPU machine without a torchvision
wheel; the GPU image has it): a timm state dict saved as safetensors loads into fastmvit and gives timm's
logits: bit for bit with timm's fused attention off (timm's manual path is ml-cvnets' arithmetic), within
float rounding with it on (timm's default, F.scaled_dot_product_attention)."""
import pytest
import torch

import fastmvit
from fastmvit.variants import VARIANTS

from .utils import images, randomize_

timm = pytest.importorskip("timm")
safetensors_torch = pytest.importorskip("safetensors.torch")


def _timm_model(variant, fused: bool):
    from timm.layers import set_fused_attn

    set_fused_attn(fused)  # read when the model is built
    try:
        return randomize_(timm.create_model(variant.timm_name), seed=7).eval()
    finally:
        set_fused_attn(True)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_logits_match_timm(name, tmp_path):
    variant = VARIANTS[name]
    exact = _timm_model(variant, fused=False)
    fused = _timm_model(variant, fused=True)
    fused.load_state_dict(exact.state_dict())
    path = tmp_path / "model.safetensors"
    safetensors_torch.save_file({k: v.contiguous() for k, v in exact.state_dict().items()}, str(path))
    model = fastmvit.load(name, weights=path)
    assert model.pretrained_cfg["source_format"] == "timm"
    for size in ((256, 256), (96, 160)):
        x = images((2, 3, *size))
        with torch.inference_mode():
            got = model(x)
            torch.testing.assert_close(got, exact(x), rtol=0, atol=0)
            torch.testing.assert_close(got, fused(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["s", "v2-1.0"])
def test_stage_features_match_timm_intermediates(name):
    """timm's features_only maps are the stage outputs, except that for v1 its last one is taken after the
    1x1 expansion (final_conv): fastmvit's forward_stages + final_conv on the last reproduces them."""
    ref = _timm_model(VARIANTS[name], fused=False)
    model = fastmvit.load(name, weights=ref.state_dict())
    x = images((1, 3, 256, 256))
    with torch.inference_mode():
        expected = ref.forward_intermediates(x, intermediates_only=True)
        got = model.forward_stages(x)
        got[-1] = model.final_conv(got[-1])
    assert len(expected) == len(got) == 5
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=0)
