"""Key layouts: the generated tables against the design notes' validated key lists, every variant's
round trip through the ml-cvnets, mmpretrain and Hugging Face layouts, and the ml-cvnets and mmpretrain
layouts checked by value against an independent conversion made from the published key tables."""
import csv
from pathlib import Path

import pytest
import torch

import fastmvit
from fastmvit.variants import VARIANTS
from fastmvit.weights import from_canonical, key_table
from fastmvit.weights.layouts import canonical_shapes

from .utils import images, randomize_

DATA = Path(__file__).parent / "data"
# (table file, variant, {layout: column}); timm and HF columns were validated by strict load_state_dict
# into those libraries when the tables were made.
TABLES = [
    ("keys_mobilevit_s.tsv", "s", {"cvnets": 0, "timm": 2, "hf": 3, "mmpretrain": 4}),
    ("keys_mobilevitv2_100.tsv", "v2-1.0", {"cvnets": 0, "timm": 2, "hf": 3}),
]


def _rows(name):
    with open(DATA / name, newline="") as f:
        return list(csv.reader(f, delimiter="\t"))[1:]


@pytest.mark.parametrize("table,variant,columns", TABLES, ids=[t[1] for t in TABLES])
def test_tables_match_design_key_lists(table, variant, columns):
    rows = _rows(table)
    shapes = canonical_shapes(variant, 1000)
    assert {r[2] for r in rows} == set(shapes)
    for r in rows:
        assert str(list(shapes[r[2]])) == r[1], r[2]
    for fmt, col in columns.items():
        generated = key_table(variant, fmt).to_canonical()
        expected = {r[2]: tuple(r[col].split(",")) for r in rows}
        assert generated == expected, fmt


ROUND_TRIPS = [(name, fmt) for name, v in VARIANTS.items() for fmt in ("cvnets", "mmpretrain", "hf")
               if not (fmt == "mmpretrain" and v.family == "v2")]  # mmpretrain has no MobileViTv2


@pytest.mark.parametrize("name,fmt", ROUND_TRIPS)
def test_round_trip_through_layout(name, fmt):
    model = randomize_(fastmvit.load(name, pretrained=False), seed=3)
    exported = from_canonical(model.state_dict(), name, fmt)
    assert not set(exported) & set(model.state_dict()) - {"head.fc.weight", "head.fc.bias"}
    if fmt == "mmpretrain":
        exported = {"meta": {"epoch": 300}, "state_dict": exported}
    loaded = fastmvit.load(name, weights=exported)
    assert loaded.pretrained_cfg["source_format"] == fmt
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_hf_query_key_value_are_packed_in_order():
    model = randomize_(fastmvit.load("xxs", pretrained=False), seed=4)
    hf = from_canonical(model.state_dict(), "xxs", "hf")
    prefix = "mobilevit.encoder.layer.2.transformer.layer.0.attention.attention"
    qkv = model.state_dict()["stages.2.1.transformer.0.attn.qkv.weight"]
    d = qkv.shape[1]
    for i, part in enumerate(("query", "key", "value")):
        assert torch.equal(hf[f"{prefix}.{part}.weight"], qkv[i * d:(i + 1) * d])


def test_exported_cvnets_checkpoint_gives_the_same_logits(tmp_path):
    model = randomize_(fastmvit.load("v2-0.5", pretrained=False), seed=5)
    path = tmp_path / "mobilevitv2-0.5.pt"
    torch.save(from_canonical(model.state_dict(), "v2-0.5", "cvnets"), path)
    x = images((2, 3, 128, 96))
    with torch.inference_mode():
        torch.testing.assert_close(fastmvit.load("v2-0.5", weights=path)(x), model(x), rtol=0, atol=0)


# ---- values, not only names: an independent conversion from the published tables ---------------------
# The tables (design notes, keys_*.tsv) list for every tensor its ml-cvnets, timm, Hugging Face and
# mmpretrain keys; timm's and HF's were validated by strict loading into those libraries. Renaming a
# timm-layout state dict (fastmvit's canonical keys: test_parity_timm loads it into timm) through a table
# column is a conversion that shares no code with fastmvit.weights. It must agree with fastmvit's export
# tensor by tensor, and fastmvit's import of it must give back every tensor and the same logits. A
# consistent mistake in fastmvit's mapping (two LayerNorms swapped, a transposed or re-packed tensor)
# passes the round trips above but not this. ml-cvnets and mmpretrain themselves do not install here
# (mmpretrain needs mmcv's compiled ops), so their code cannot write the weights.
VALUE_CASES = [(table, variant, fmt, col) for table, variant, cols in TABLES for fmt, col in cols.items()
               if fmt in ("cvnets", "mmpretrain")]


def _table_conversion(table, column, canonical):
    """``canonical`` (timm keys) renamed to the table's ``column``: {key: tensor}."""
    out = {}
    for row in _rows(table):
        (target,) = row[column].split(",")      # one key each in ml-cvnets and mmpretrain (no HF-style split)
        out[target] = canonical[row[2]]
    return out


@pytest.mark.parametrize("table,variant,fmt,column", VALUE_CASES, ids=[f"{c[1]}-{c[2]}" for c in VALUE_CASES])
def test_layout_values_match_an_independent_conversion(table, variant, fmt, column):
    model = randomize_(fastmvit.load(variant, pretrained=False), seed=21)
    canonical = model.state_dict()
    assert len({v.data_ptr() for v in canonical.values()}) == len(canonical)
    independent = _table_conversion(table, column, canonical)
    # export: fastmvit's conversion puts every tensor, unchanged, under the table's key
    exported = from_canonical(canonical, variant, fmt)
    assert exported.keys() == independent.keys()
    for key, value in independent.items():
        assert torch.equal(exported[key], value), f"export: {key} holds the wrong tensor"
    # import: the independently converted checkpoint loads into the same tensors and the same logits
    checkpoint = {"meta": {}, "state_dict": independent} if fmt == "mmpretrain" else independent
    loaded = fastmvit.load(variant, weights=checkpoint, numerics="cvnets")
    assert loaded.pretrained_cfg["source_format"] == fmt
    for key, value in canonical.items():
        assert torch.equal(loaded.state_dict()[key], value), f"import: {key} holds the wrong tensor"
    x = images((2, 3, 64, 96))
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
