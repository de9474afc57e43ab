"""Key layouts of the four public MobileViT implementations, generated from fastmvit's own module tree.

fastmvit's parameter names are timm's (the canonical layout). For a variant and a layout this module
builds the complete table canonical key -> that layout's key(s); loading inverts it, exporting reads
it forwards. Building tables from the module tree (rather than renaming with regexes) means every key
of every variant is accounted for, so a mismatch can name exactly what is missing or unexpected.

Tables are checked against ``../shared/design/keys_*.tsv`` (validated by strict loads into timm and
Hugging Face) in ``tests/test_layouts.py``.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Dict, Tuple

import torch

from ..errors import OptionError
from ..variants import Variant, get_variant

__all__ = ["FORMATS", "KeyTable", "key_table", "canonical_shapes"]

FORMATS = ("timm", "hf", "cvnets", "mmpretrain")

_IR = {"conv1_1x1": 0, "conv2_kxk": 1, "conv3_1x1": 2}
_HF_IR = ("expand_1x1", "conv_3x3", "reduce_1x1")
_CV_IR = ("exp_1x1", "conv_3x3", "red_1x1")


def _hf_sub(sub: str) -> str:
    return {"conv": "convolution", "bn": "normalization"}[sub]


def _cv_sub(sub: str) -> str:
    return {"conv": "conv", "bn": "norm"}[sub]


# Each translator takes a canonical (timm) key split into its parts and returns the key(s) in its layout.

def _to_hf(key: str, v: Variant) -> Tuple[str, ...]:
    top = "mobilevit" if v.family == "v1" else "mobilevitv2"
    m = re.fullmatch(r"stem\.(conv|bn)\.(\w+)", key)
    if m:
        return (f"{top}.conv_stem.{_hf_sub(m[1])}.{m[2]}",)
    m = re.fullmatch(r"stages\.(\d)\.(\d)\.(conv1_1x1|conv2_kxk|conv3_1x1)\.(conv|bn)\.(\w+)", key)
    if m:
        s, j = int(m[1]), int(m[2])
        where = f"layer.{j}" if s < 2 else "downsampling_layer"
        return (f"{top}.encoder.layer.{s}.{where}.{_HF_IR[_IR[m[3]]]}.{_hf_sub(m[4])}.{m[5]}",)
    m = re.fullmatch(r"stages\.(\d)\.1\.(.+)", key)
    if m:
        blk, rest = f"{top}.encoder.layer.{m[1]}", m[2]
        for pat, rep in (
            (r"conv_kxk\.(conv|bn)\.(\w+)", lambda m: f"conv_kxk.{_hf_sub(m[1])}.{m[2]}"),
            (r"conv_1x1\.weight", lambda m: "conv_1x1.convolution.weight"),
            (r"norm\.(\w+)", lambda m: f"layernorm.{m[1]}"),
            (r"conv_proj\.(conv|bn)\.(\w+)", lambda m: f"conv_projection.{_hf_sub(m[1])}.{m[2]}"),
            (r"conv_fusion\.(conv|bn)\.(\w+)", lambda m: f"fusion.{_hf_sub(m[1])}.{m[2]}"),
        ):
            mm = re.fullmatch(pat, rest)
            if mm:
                return (f"{blk}.{rep(mm)}",)
        mm = re.fullmatch(r"transformer\.(\d+)\.(.+)", rest)
        t, part = f"{blk}.transformer.layer.{mm[1]}", mm[2]
        if v.family == "v1":
            if part in ("attn.qkv.weight", "attn.qkv.bias"):  # HF keeps q, k, v as three Linears
                p = part.rsplit(".", 1)[1]
                return tuple(f"{t}.attention.attention.{n}.{p}" for n in ("query", "key", "value"))
            table = {"norm1": "layernorm_before", "attn.proj": "attention.output.dense",
                     "norm2": "layernorm_after", "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}
        else:
            table = {"norm1": "layernorm_before", "attn.qkv_proj": "attention.qkv_proj.convolution",
                     "attn.out_proj": "attention.out_proj.convolution", "norm2": "layernorm_after",
                     "mlp.fc1": "ffn.conv1.convolution", "mlp.fc2": "ffn.conv2.convolution"}
        mod, p = part.rsplit(".", 1)
        return (f"{t}.{table[mod]}.{p}",)
    m = re.fullmatch(r"final_conv\.(conv|bn)\.(\w+)", key)
    if m:
        return (f"{top}.conv_1x1_exp.{_hf_sub(m[1])}.{m[2]}",)
    m = re.fullmatch(r"head\.fc\.(\w+)", key)
    if m:
        return (f"classifier.{m[1]}",)
    raise KeyError(key)


def _to_cvnets(key: str, v: Variant) -> Tuple[str, ...]:
    m = re.fullmatch(r"stem\.(conv|bn)\.(\w+)", key)
    if m:
        return (f"conv_1.block.{_cv_sub(m[1])}.{m[2]}",)
    m = re.fullmatch(r"stages\.(\d)\.(\d)\.(conv1_1x1|conv2_kxk|conv3_1x1)\.(conv|bn)\.(\w+)", key)
    if m:
        return (f"layer_{int(m[1]) + 1}.{m[2]}.block.{_CV_IR[_IR[m[3]]]}.block.{_cv_sub(m[4])}.{m[5]}",)
    m = re.fullmatch(r"stages\.(\d)\.1\.(.+)", key)
    if m:
        s = int(m[1])
        blk, rest = f"layer_{s + 1}.1", m[2]
        depth = v.stages[s].transformer.depth
        local_kxk, local_1x1 = ("local_rep.conv_3x3", "local_rep.conv_1x1") if v.family == "v1" \
            else ("local_rep.0", "local_rep.1")
        for pat, rep in (
            (r"conv_kxk\.(conv|bn)\.(\w+)", lambda m: f"{local_kxk}.block.{_cv_sub(m[1])}.{m[2]}"),
            (r"conv_1x1\.weight", lambda m: f"{local_1x1}.block.conv.weight"),
            (r"norm\.(\w+)", lambda m: f"global_rep.{depth}.{m[1]}"),
            (r"conv_proj\.(conv|bn)\.(\w+)", lambda m: f"conv_proj.block.{_cv_sub(m[1])}.{m[2]}"),
            (r"conv_fusion\.(conv|bn)\.(\w+)", lambda m: f"fusion.block.{_cv_sub(m[1])}.{m[2]}"),
        ):
            mm = re.fullmatch(pat, rest)
            if mm:
                return (f"{blk}.{rep(mm)}",)
        mm = re.fullmatch(r"transformer\.(\d+)\.(.+)\.(\w+)", rest)
        t, mod, p = f"{blk}.global_rep.{mm[1]}", mm[2], mm[3]
        if v.family == "v1":
            table = {"norm1": "pre_norm_mha.0", "attn.qkv": "pre_norm_mha.1.qkv_proj",
                     "attn.proj": "pre_norm_mha.1.out_proj", "norm2": "pre_norm_ffn.0",
                     "mlp.fc1": "pre_norm_ffn.1", "mlp.fc2": "pre_norm_ffn.4"}
        else:
            table = {"norm1": "pre_norm_attn.0", "attn.qkv_proj": "pre_norm_attn.1.qkv_proj.block.conv",
                     "attn.out_proj": "pre_norm_attn.1.out_proj.block.conv", "norm2": "pre_norm_ffn.0",
                     "mlp.fc1": "pre_norm_ffn.1.block.conv", "mlp.fc2": "pre_norm_ffn.3.block.conv"}
        return (f"{t}.{table[mod]}.{p}",)
    m = re.fullmatch(r"final_conv\.(conv|bn)\.(\w+)", key)
    if m:
        return (f"conv_1x1_exp.block.{_cv_sub(m[1])}.{m[2]}",)
    m = re.fullmatch(r"head\.fc\.(\w+)", key)
    if m:
        return (f"classifier.fc.{m[1]}",) if v.family == "v1" else (f"classifier.1.{m[1]}",)
    raise KeyError(key)


def _to_mmpretrain(key: str, v: Variant) -> Tuple[str, ...]:
    if v.family != "v1":
        raise KeyError("mmpretrain has no MobileViTv2")
    m = re.fullmatch(r"stem\.(.+)", key)
    if m:
        return (f"backbone.stem.{m[1]}",)
    m = re.fullmatch(r"stages\.(\d)\.(\d)\.(conv1_1x1|conv2_kxk|conv3_1x1)\.(.+)", key)
    if m:
        return (f"backbone.layers.{m[1]}.{m[2]}.conv.{_IR[m[3]]}.{m[4]}",)
    m = re.fullmatch(r"stages\.(\d)\.1\.(.+)", key)
    if m:
        s = int(m[1])
        blk, rest = f"backbone.layers.{s}.1", m[2]
        depth = v.stages[s].transformer.depth
        for pat, rep in (
            (r"conv_kxk\.(.+)", lambda m: f"local_rep.0.{m[1]}"),
            (r"conv_1x1\.weight", lambda m: "local_rep.1.conv.weight"),
            (r"norm\.(\w+)", lambda m: f"global_rep.{depth}.{m[1]}"),
            (r"(conv_proj|conv_fusion)\.(.+)", lambda m: f"{m[1]}.{m[2]}"),
        ):
            mm = re.fullmatch(pat, rest)
            if mm:
                return (f"{blk}.{rep(mm)}",)
        mm = re.fullmatch(r"transformer\.(\d+)\.(.+)\.(\w+)", rest)
        table = {"norm1": "ln1", "attn.qkv": "attn.qkv", "attn.proj": "attn.proj", "norm2": "ln2",
                 "mlp.fc1": "ffn.layers.0.0", "mlp.fc2": "ffn.layers.1"}
        return (f"{blk}.global_rep.{mm[1]}.{table[mm[2]]}.{mm[3]}",)
    m = re.fullmatch(r"final_conv\.(.+)", key)
    if m:
        return (f"backbone.conv_1x1_exp.{m[1]}",)
    m = re.fullmatch(r"head\.fc\.(\w+)", key)
    if m:
        return (f"head.fc.{m[1]}",)
    raise KeyError(key)


_TRANSLATORS = {"timm": lambda key, v: (key,), "hf": _to_hf, "cvnets": _to_cvnets, "mmpretrain": _to_mmpretrain}


@functools.lru_cache(maxsize=None)
def canonical_shapes(variant_name: str, num_classes: int) -> Dict[str, Tuple[int, ...]]:
    """Every tensor of fastmvit's state dict and its shape, built on the meta device (no memory)."""
    from ..model import MobileViT

    with torch.device("meta"):
        model = MobileViT(variant_name, num_classes)
    return {k: tuple(t.shape) for k, t in model.state_dict().items()}


@dataclass(frozen=True)
class KeyTable:
    """canonical key -> key(s) of one layout, for one variant. A canonical key maps to several keys
    only where the layout splits a tensor (HF's separate query/key/value); those are concatenated
    along dim 0 on load."""

    variant: str
    fmt: str
    entries: Tuple[Tuple[str, Tuple[str, ...]], ...]

    def to_canonical(self) -> Dict[str, Tuple[str, ...]]:
        return dict(self.entries)

    def source_keys(self) -> Dict[str, str]:
        """layout key -> canonical key."""
        return {src: canon for canon, srcs in self.entries for src in srcs}


@functools.lru_cache(maxsize=None)
def key_table(variant: str, fmt: str, num_classes: int = 1000) -> KeyTable:
    v = get_variant(variant)
    if fmt not in _TRANSLATORS:
        raise OptionError(f"unknown checkpoint layout {fmt!r}; known: {FORMATS}")
    translate = _TRANSLATORS[fmt]
    entries = tuple((k, translate(k, v)) for k in canonical_shapes(v.name, num_classes))
    return KeyTable(v.name, fmt, entries)
