"""Batch-1 work distribution: the split rule (kernels._common.split_rule), split-K of the 3x3 conv and the
token split of the separable-attention context, each against its plain-PyTorch reference and the unsplit
path, with the splits forced (argument or FASTMVIT_SPLIT) since the interpreter never splits by itself."""
import pytest
import torch

from fastmvit.errors import OptionError
from fastmvit.kernels import _common as C
from fastmvit.kernels import conv as K
from fastmvit.kernels import sepattn as S
from fastmvit.kernels.dwconv import out_size
from fastmvit.ops.sepattn import sepattn_context_reference

from .common import DEVICE, DTYPES, assert_within_torch_error, compiled_resources, dtype_id
from .test_conv import check, make

# --------------------------------------------------------------------------------------------------
# the rule
# --------------------------------------------------------------------------------------------------


def rule(ctas, steps, **kw):
    return C.split_rule(ctas, steps, C.STEP_GEMM, 132, interpret=False, **kw)


def test_rule_splits_the_stage5_fusion_conv_of_s_at_batch_1(monkeypatch):
    monkeypatch.delenv("FASTMVIT_SPLIT", raising=False)
    d = K.conv3x3_split(160, 160, 160, 64, K.conv3x3_config(160, 160, 160, 64, torch.float16, False, False),
                        False, 132, interpret=False)
    assert (d.ctas, d.steps) == (3, 90)
    assert d.n > 1 and d.split_s <= C.SPLIT_MARGIN * d.unsplit_s
    assert d.unsplit_s == pytest.approx(90 * C.STEP_GEMM)
    # at batch 256 the grid fills the GPU many times over: nothing to win
    big = K.conv3x3_split(160, 160, 160, 256 * 64,
                          K.conv3x3_config(160, 160, 160, 256 * 64, torch.float16, False, False), False, 132,
                          interpret=False)
    assert big.n == 1


def test_rule_margin_force_and_caps(monkeypatch):
    monkeypatch.delenv("FASTMVIT_SPLIT", raising=False)
    assert rule(10, 3, max_split=1).n == 1                      # the pooling GEMM: judged, never split
    assert rule(10, 3).n == 1                                   # 0.3 us against a merge launch
    # a split exactly at the margin is taken, one a hair above it is not
    d = rule(1, 200)
    assert d.n == d.best_n > 1
    unsplit = C.waves_latency(1, 200, C.STEP_GEMM, 132)
    assert d.unsplit_s == unsplit and d.split_s == min(
        C.split_estimate(1, 200, C.STEP_GEMM, 132, n) for n in range(2, C.MAX_SPLIT + 1))
    monkeypatch.setattr(C, "SPLIT_MARGIN", d.split_s / unsplit)
    assert rule(1, 200).n == d.n
    monkeypatch.setattr(C, "SPLIT_MARGIN", d.split_s / unsplit * 0.999)
    assert rule(1, 200).n == 1
    # forced: capped at the serial steps and at max_split; the interpreter splits only when forced
    assert rule(1, 5, force=8).n == 5 and rule(1, 50, force=99).n == C.MAX_SPLIT
    assert rule(1, 50, force=4, max_split=1).n == 1
    assert C.split_rule(1, 200, C.STEP_GEMM, 132, interpret=True).n == 1
    assert C.split_rule(1, 200, C.STEP_GEMM, 132, interpret=True, force=3).n == 3
    monkeypatch.setenv("FASTMVIT_SPLIT", "3")
    assert rule(1, 200).n == 3 and rule(1, 200).forced
    monkeypatch.setenv("FASTMVIT_SPLIT", "1")
    assert rule(1, 200).n == 1
    monkeypatch.setenv("FASTMVIT_SPLIT", "0")
    with pytest.raises(OptionError, match="FASTMVIT_SPLIT must be a positive integer"):
        rule(1, 200)


def test_sm_count_of_cpu_tensors_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv("FASTMVIT_SM_COUNT", raising=False)
    assert C.sm_count("cpu") == 132
    monkeypatch.setenv("FASTMVIT_SM_COUNT", "16")
    assert C.sm_count(torch.device("cpu")) == 16
    x = torch.empty(1, 4, 4, 160, dtype=torch.float16)  # a plan reads it: 16 SMs fill after 16 CTAs
    assert K.conv3x3_split(160, 160, 160, 64, (64, 64, 32, 4, 3), False, C.sm_count(x.device), force=None,
                           interpret=False).n < rule(3, 90).n
    # the shared helper reaches the attention launcher: 32 programs of 128 queries fill 16 SMs twice over
    from fastmvit.kernels import attention as A
    monkeypatch.setattr(C, "INTERPRET", False)
    assert A.launch_config(256, 16, torch.float16, 32, x.device).BLOCK_M == 128
    monkeypatch.setenv("FASTMVIT_SM_COUNT", "132")
    assert A.launch_config(256, 16, torch.float16, 32, x.device).BLOCK_M == 64
    monkeypatch.setenv("FASTMVIT_SM_COUNT", "many")
    with pytest.raises(OptionError, match="FASTMVIT_SM_COUNT"):
        C.sm_count("cpu")


# --------------------------------------------------------------------------------------------------
# split-K conv
# --------------------------------------------------------------------------------------------------

# (B, H, W, C1, C2, Cout, stride): the interpreter's BLOCK_K is pow2(max(C1, C2)) <= 128, so K steps are
# 9 (one input), 18 (fusion) or 9 * 2 (C = 129: a ragged last chunk)
CONV_CASES = [
    (2, 7, 9, 24, 24, 24, 1),     # fusion conv over [x, x2], batch 2, 18 steps
    (1, 5, 5, 48, 16, 40, 1),     # unequal halves: a split straddles the x / x2 boundary
    (1, 6, 6, 129, 0, 20, 2),     # K not a multiple of the tile, stride 2
    (2, 3, 5, 33, 0, 17, 1),      # odd channel counts (scalar accesses)
]
SPLITS = [2, 4, 5, 7]  # 9 and 18 steps: none divides evenly; 4 of 9 leaves an empty split


def conv_id(c):
    return "B{}-H{}W{}-C{}+{}-O{}-s{}".format(*c)


def run_conv(x, x2, w, b, stride, split):
    B, H, W, c1 = x.shape
    y = torch.full((B, out_size(H, stride), out_size(W, stride), w.shape[1]), float("nan"), dtype=x.dtype,
                   device=x.device)
    return K.conv3x3_launch(x, tuple(x.stride()), H, W, c1, x2, w, b, y, stride, True, split=split)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", CONV_CASES, ids=conv_id)
def test_split_k_conv(case, dtype, monkeypatch):
    B, H, W, c1, c2, cout, stride = case
    x, x2, w, b = make(B, H, W, c1, c2, cout, False, dtype)
    plain = run_conv(x, x2, w, b, stride, 1)
    check(x, w, b, plain, f"{conv_id(case)} unsplit", stride=stride, act=True, x2=x2)
    for n in SPLITS:
        plan = K.conv3x3_plan(x, tuple(x.stride()), H, W, c1, x2, tuple(plain.shape), stride, True, n)
        assert isinstance(plan, K.SplitConvLaunch) and plan.main.grid[2] == n
        out = run_conv(x, x2, w, b, stride, n)
        what = f"{conv_id(case)} split {n}"
        check(x, w, b, out, what, stride=stride, act=True, x2=x2)
        # against the unsplit kernel: only the fp32 summation order differs
        torch.testing.assert_close(out.float(), plain.float(), rtol=0,
                                   atol=4 * C_EPS[dtype] * plain.float().abs().max().item(), msg=what)
        assert torch.equal(out, run_conv(x, x2, w, b, stride, n)), f"{what}: not deterministic"


C_EPS = {torch.float32: 1.2e-7, torch.float16: 9.8e-4, torch.bfloat16: 7.8e-3}


def test_split_forced_through_the_environment(monkeypatch):
    """FASTMVIT_SPLIT reaches the op's plan; 1 turns splitting off; the stem (one K step) never splits."""
    from fastmvit.ops.conv import conv3x3, conv3x3_plan

    x, x2, w, b = make(1, 4, 6, 24, 24, 24, False, torch.float32, seed=3)
    monkeypatch.setenv("FASTMVIT_SPLIT", "3")
    plan = conv3x3_plan(x, w, b, stride=1, act=True, x2=x2)
    assert isinstance(plan.launch, K.SplitConvLaunch) and plan.launch.decision.n == 3
    check(x, w, b, conv3x3(x, w, b, stride=1, act=True, x2=x2), "env split 3", stride=1, act=True, x2=x2)
    stem_x, _, stem_w, stem_b = make(1, 8, 8, 3, 0, 16, True, torch.float32)
    assert not isinstance(conv3x3_plan(stem_x, stem_w, stem_b, stride=2, act=True, input_nchw=True).launch,
                          K.SplitConvLaunch)
    monkeypatch.setenv("FASTMVIT_SPLIT", "1")
    assert not isinstance(conv3x3_plan(x, w, b, stride=1, act=True, x2=x2).launch, K.SplitConvLaunch)


# --------------------------------------------------------------------------------------------------
# token-split separable-attention context
# --------------------------------------------------------------------------------------------------

# (B, H, W, d, C, q_col, k_col): sequences of 35, 72 and 9 tokens; BT = 16 gives 3, 5 and 1 steps
CONTEXT_CASES = [
    (2, 10, 14, 24, 49, 0, 1),      # checkpoint layout q | k | v, batch 2
    (1, 16, 18, 33, 70, 66, 0),     # odd d, packed-like layout; 5 steps: split 4 leaves an empty split
    (1, 6, 6, 17, 40, 0, 1),        # one step: nothing to split
]


def context_id(c):
    return "B{}-H{}W{}-d{}-C{}".format(*c[:5])


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", CONTEXT_CASES, ids=context_id)
def test_token_split_context(case, dtype, monkeypatch):
    B, H, W, d, ch, qc, kc = case
    g = torch.Generator().manual_seed(5)
    qkv = torch.randn(B * H * W, ch, generator=g)
    # q spans a wide range, rising along the sequence: every split has its own max, far from the others
    n = torch.arange(B * H * W, dtype=torch.float32)
    qkv[:, qc] = qkv[:, qc] * 4 + (n % (H * W)) / (H * W) * 12
    qkv = qkv.to(DEVICE, dtype)
    ref64 = sepattn_context_reference(qkv.double(), d, H, W, q_col=qc, k_col=kc).double()
    same = sepattn_context_reference(qkv, d, H, W, q_col=qc, k_col=kc)
    plain = S.context(qkv, d, H, W, qc, kc, blocks=(16, 16), split=1)
    assert_within_torch_error(plain, ref64, same, f"{context_id(case)} unsplit")
    steps = -(-(H // 2) * (W // 2) // 16)
    for n_split in (2, 3, 4):
        plan = S.context_plan(qkv, d, H, W, qc, kc, blocks=(16, 16), split=n_split)
        assert (plan.merge is not None) == (steps > 1) and plan.decision.n == min(n_split, steps)
        out = S.context(qkv, d, H, W, qc, kc, blocks=(16, 16), split=n_split)
        what = f"{context_id(case)} split {n_split}"
        assert_within_torch_error(out, ref64, same, what)
        torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-6, msg=what)
        assert torch.equal(out, S.context(qkv, d, H, W, qc, kc, blocks=(16, 16), split=n_split)), what


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_token_split_context_takes_the_common_max(dtype):
    """q about -100 in the first split and +100 in the last: rescaling to any one split's max but the
    largest overflows float32's exp (the merge must take the common max, not the first split's)."""
    B, H, W, d = 1, 8, 16, 24                       # 32 tokens: two 16-token steps
    g = torch.Generator().manual_seed(9)
    qkv = torch.randn(B * H * W, d + 1, generator=g)
    rows = torch.arange(H * W)
    first = (rows // W) // 2 * (W // 2) + (rows % W) // 2 < 16   # the token index n of each pixel
    qkv[:, 0] += torch.where(first, -100.0, 100.0)
    qkv = qkv.to(DEVICE, dtype)
    ref64 = sepattn_context_reference(qkv.double(), d, H, W).double()
    out = S.context(qkv, d, H, W, blocks=(16, 16), split=2)
    assert_within_torch_error(out, ref64, sepattn_context_reference(qkv, d, H, W), "common max")


def test_context_split_is_never_picked_at_256_but_is_for_large_maps(monkeypatch):
    """The rule at v2's stage-3 map (the longest sequence): 32x32 at a 256^2 input, 128x128 at 1024^2."""
    monkeypatch.delenv("FASTMVIT_SPLIT", raising=False)
    monkeypatch.setattr(C, "INTERPRET", False)  # the GPU's blocks and rule; nothing is launched

    def decision(side, d=128):
        qkv = torch.empty(side * side, 2 * d + 16)
        return S.context_plan(qkv, d, side, side, 2 * d, 0).decision

    assert decision(32).n == 1 and decision(16).n == 1 and decision(64).n == 1
    big = decision(128)
    assert big.n > 1 and big.split_s <= C.SPLIT_MARGIN * big.unsplit_s


# --------------------------------------------------------------------------------------------------
# sm_90 compile check of the new kernels (all of them: ``python -m fastmvit.kernels check``)
# --------------------------------------------------------------------------------------------------

def test_split_kernels_compile_for_sm90_without_spills():
    conv_names = ["conv3x3-fusion-C160+160-O160-BM64BN64BK32-splitk-fp16",  # S's stage-5 fusion conv, split
                  "conv3x3-splitk-merge-BM32BN128V8-fp16"]
    context_names = ["sepattn_context-fp16-packed-split", "sepattn_context_merge"]
    used = compiled_resources(K.__name__, conv_names) + compiled_resources(S.__name__, context_names)
    for use in used:
        assert use["stack"] == 0, use
    by_name = {u["name"]: u for u in used}
    assert by_name[conv_names[0]]["wgmma"] > 0  # the split conv keeps its tensor-core dots
