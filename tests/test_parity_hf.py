"""End to end against Hugging Face transformers: random weights with random BatchNorm statistics, saved with
``save_pretrained`` and loaded by ``fastmvit.load``; logits and stage features compared on the same input."""
import pytest
import torch

import fastmvit
from fastmvit.variants import VARIANTS

from .utils import hf_model, images, randomize_

pytest.importorskip("transformers")


@pytest.fixture(scope="module", params=list(VARIANTS))
def hf_pair(request, tmp_path_factory):
    variant = VARIANTS[request.param]
    # a fixed seed per variant (hash() of a string changes with PYTHONHASHSEED: a failure would not repeat)
    hf = randomize_(hf_model(variant), seed=100 + list(VARIANTS).index(variant.name))
    path = tmp_path_factory.mktemp(variant.name.replace(".", "_"))
    hf.save_pretrained(path)
    return hf, fastmvit.load(variant.name, weights=path), path


def test_logits_and_stage_features_match_hf_at_256(hf_pair):
    hf, model, _ = hf_pair
    x = images((2, 3, 256, 256))
    with torch.inference_mode():
        out = hf(x, output_hidden_states=True)
        stages = model.forward_stages(x)
        logits = model.forward_head(model.final_conv(stages[-1]))
    assert model.pretrained_cfg["source_format"] == "hf"
    # HF numerics (scale after q@k^T, unfold/fold without resize): the same arithmetic, so exact.
    torch.testing.assert_close(logits, out.logits, rtol=0, atol=0)
    assert len(stages) == len(out.hidden_states) == 5
    for got, expected in zip(stages, out.hidden_states):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_logits_match_hf_non_square(hf_pair):
    """96x160: v1 interpolates around the transformer at 3x5, v2's last stage map is odd (3x5)."""
    hf, model, _ = hf_pair
    x = images((2, 3, 96, 160))
    with torch.inference_mode():
        torch.testing.assert_close(model(x), hf(x).logits, rtol=0, atol=0)


def test_cvnets_numerics_agree_with_hf_within_float_rounding(hf_pair):
    """The default (ml-cvnets / timm) arithmetic differs from HF's only in where the attention scale is
    applied (~1e-7, mobilevit.md D1) at sizes where every v2 stage map is even (128x128 here)."""
    hf, _, path = hf_pair
    model = fastmvit.load(hf_pair[1].variant.name, weights=path, numerics="cvnets")
    x = images((2, 3, 128, 128))
    with torch.inference_mode():
        torch.testing.assert_close(model(x), hf(x).logits, rtol=0, atol=2e-6)


def test_hf_odd_v2_semantics_differ_from_cvnets():
    """At 224x224 the v2 stage maps are odd: HF drops a row/column where ml-cvnets and timm resize. The
    switch must change the answer (otherwise one of the two paths is not being exercised)."""
    variant = VARIANTS["v2-0.5"]
    state = randomize_(fastmvit.load(variant.name, pretrained=False)).state_dict()
    x = images((1, 3, 224, 224))
    with torch.inference_mode():
        cv = fastmvit.load(variant.name, weights=state, numerics="cvnets")(x)
        hf = fastmvit.load(variant.name, weights=state, numerics="hf")(x)
    assert (cv - hf).abs().max() > 1e-3
