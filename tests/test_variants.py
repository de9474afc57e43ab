"""The variant table: exact parameter counts (design notes section 3 and 5) and name resolution."""
import pytest
import torch

import fastmvit
from fastmvit import MobileViT, get_variant, list_models
from fastmvit.variants import VARIANTS, make_divisible

PARAMS = {  # from mobilevit.md; identical in ml-cvnets, timm and Hugging Face
    "xxs": 1_272_024, "xs": 2_317_848, "s": 5_578_632,
    "v2-0.5": 1_370_593, "v2-0.75": 2_866_009, "v2-1.0": 4_901_841, "v2-1.25": 7_478_089,
    "v2-1.5": 10_594_753, "v2-1.75": 14_251_833, "v2-2.0": 18_449_329,
}


def test_every_variant_is_listed():
    assert list_models() == list(PARAMS)


@pytest.mark.parametrize("name", list(PARAMS))
def test_parameter_count(name):
    with torch.device("meta"):
        model = MobileViT(name)
    assert sum(p.numel() for p in model.parameters()) == PARAMS[name]


@pytest.mark.parametrize("alias,name", [
    ("s", "s"), ("S", "s"), ("mobilevit_s", "s"), ("mobilevit_xxs.cvnets_in1k", "xxs"),
    ("apple/mobilevit-x-small", "xs"), ("v2-1.0", "v2-1.0"), ("v2-1", "v2-1.0"), ("v2-0.50", "v2-0.5"),
    ("mobilevitv2_100", "v2-1.0"), ("mobilevitv2_200.cvnets_in22k_ft_in1k_384", "v2-2.0"),
    ("mobilevitv2_075", "v2-0.75"),
])
def test_aliases(alias, name):
    assert get_variant(alias).name == name


@pytest.mark.parametrize("bad", ["m", "mobilevit_m", "v2-3.0", "resnet50", ""])
def test_unknown_name_lists_valid_ones(bad):
    with pytest.raises(ValueError, match="valid names: 'xxs' \\(mobilevit_xxs\\).*'v2-2.0' \\(mobilevitv2_200\\)"):
        get_variant(bad)
    with pytest.raises(fastmvit.FastMViTError):  # one type for every bad name or option, a ValueError too
        fastmvit.load(bad, pretrained=False)


def test_name_must_be_a_string():
    with pytest.raises(TypeError):
        get_variant(3)


def test_make_divisible_matches_cvnets():
    assert [make_divisible(v, 8) for v in (16 * 0.75, 32 * 1.25, 64 * 1.75, 30)] == [16, 40, 112, 32]
    assert make_divisible(24 * 0.5, 8, 16) == 16


def test_v2_widths_follow_the_design_table():
    # c0 .. c5 and attention dims per width (mobilevit.md section 5)
    table = {0.5: (16, 32, 64, 128, 192, 256, 64, 96, 128), 1.75: (56, 112, 224, 448, 672, 896, 224, 336, 448)}
    for width, expected in table.items():
        v = VARIANTS[f"v2-{width}"]
        dims = tuple(s.transformer.dim for s in v.stages[2:])
        assert (v.stem_channels, *v.stage_channels, *dims) == expected
        assert all(s.transformer.ffn_dim == 2 * s.transformer.dim for s in v.stages[2:])
