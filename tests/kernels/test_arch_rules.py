"""Launch rules below sm_90: the tiles that spill on sm_80 under triton 3.6 get smaller per-thread shares
there, while sm_90's configurations stay what they were (checked by compiling: ``python -m
fastmvit.kernels check --arch 80`` under triton 3.6 and 3.9; see bench/check_triton.sh)."""
import pytest
import torch

from fastmvit.kernels import _common, conv, gemm, mv2_block


def _names(module, arch):
    return {c.name: c for c in module.compile_configs(arch=arch)}


def test_gemm_sm80_tiles(monkeypatch):
    """fp32 64x64x32 (spilled at 96 registers) takes 32 rows; the 16-bit 64x64x64 statistics tile (bf16
    spilled at 128) takes 8 warps. Nothing else moves, and sm_90 keeps its tiles."""
    monkeypatch.setattr(_common, "INTERPRET", False)  # gemm.compile_configs asks the GPU's rules this way
    sm90, sm80 = _names(gemm, 90), _names(gemm, 80)
    assert "gemm-fp32-plain-64x64x32-w4s2-div16:ayKN" in sm90 and "gemm-bf16-stats-64x64x64-w4s3-div16:ayKN" in sm90
    assert "gemm-fp32-plain-32x64x32-w4s2-div16:ayKN" in sm80 and "gemm-bf16-stats-64x64x64-w8s3-div16:ayKN" in sm80
    assert not any("-fp32-" in n and "-64x64x32-" in n and "pool" not in n for n in sm80)
    assert not any("-stats-64x64x64-w4" in n for n in sm80)
    kw = dict(rows=4096, interpret=False)
    assert gemm.pick_config(8192, 64, 128, torch.float16, **kw, arch=80) == gemm.GemmConfig(64, 64, 64, 8, 3)
    assert gemm.pick_config(8192, 64, 128, torch.float16, **kw, arch=90) == gemm.GemmConfig(64, 64, 64, 4, 3)
    assert gemm.pick_config(8192, 64, 128, torch.float16, interpret=False, arch=80) == \
        gemm.pick_config(8192, 64, 128, torch.float16, interpret=False, arch=90)  # no statistics: unchanged


def test_conv_and_inverted_residual_sm80_tiles():
    """The 64+64 fusion conv's 128x64x64 tile takes 8 warps below sm_90 (255 registers and a spill with 4);
    a 16-bit inverted residual on 4 warps takes 32 pixels (24-48-24 spilled at 64)."""
    c90, c80 = _names(conv, 90), _names(conv, 80)
    name = "conv3x3-fusion-C64+64-O64-BM128BN64BK64-fp16"
    assert (c90[name].num_warps, c80[name].num_warps) == (4, 8)
    m90, m80 = _names(mv2_block, 90), _names(mv2_block, 80)
    for dt in ("fp16", "bf16"):
        name = f"inverted_residual-24-48-24-s1-res-{dt}"
        assert (m90[name].constexprs["BLOCK_M"], m80[name].constexprs["BLOCK_M"]) == (64, 32)
    name = "inverted_residual-24-48-24-s1-res-fp32"  # fp32 did not spill: unchanged
    assert m90[name] == m80[name]


def test_plans_follow_the_target_arch(monkeypatch):
    """A launch plan resolves the rules of its device's arch; off a GPU, sm_90 unless ``assume_arch`` says
    otherwise (what the ahead-of-time warm-up for sm_80 records)."""
    monkeypatch.setattr(_common, "INTERPRET", False)  # the GPU's rules; nothing is launched
    assert _common.target_arch(torch.device("cpu")) == 90
    x = torch.empty(2, 32, 32, 24, dtype=torch.float16)

    def block_m():
        return mv2_block.inverted_residual_plan(x, 48, (2, 32, 32, 24), 1, True).meta["BLOCK_M"]

    a = torch.empty(8192, 128, dtype=torch.float32)
    w = torch.empty(128, 64, dtype=torch.float32)

    def gemm_bm():
        return gemm.gemm_plan(a, w, 64).launch.meta["BM"]

    assert (block_m(), gemm_bm()) == (64, 64)
    with _common.assume_arch(80):
        assert _common.target_arch(torch.device("cpu")) == 80
        assert (block_m(), gemm_bm()) == (32, 32)
    assert (block_m(), gemm_bm()) == (64, 64)


@pytest.mark.parametrize("module", [gemm, conv, mv2_block], ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_sm80_configs_are_distinct_and_complete(module):
    """As many unsplit specialisations below sm_90 as on it (a rule moves tiles, it never drops a use). The
    split-K ones follow the split rule, which judges the grids against each arch's SMs (132 / 108), so
    their count may differ."""
    c90, c80 = module.compile_configs(arch=90), module.compile_configs(arch=80)
    assert len({(c.name, c.num_warps) for c in c80}) == len(c80) > 0
    unsplit = [[c for c in cs if "splitk" not in c.name] for cs in (c90, c80)]
    assert len(unsplit[1]) == len(unsplit[0]) > 0
