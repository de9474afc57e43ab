"""The fused GEMM (fastmvit.ops.gemm) against its unfused PyTorch reference, every switch the engine uses,
at awkward shapes; and one v1 transformer layer's GEMM parts against fastmvit.model.blocks."""
import math

import pytest
import torch

from fastmvit.kernels import gemm as kg
from fastmvit.model.blocks import TransformerLayer
from fastmvit.ops.gemm import (finalize_group_stats, group_stats_reference, linear, linear_reference, pack_linear)
from fastmvit.variants import VARIANTS, TransformerSpec
from tests.kernels.common import DEVICE, DTYPES, ON_GPU, assert_within_torch_error, dtype_id


def rand(*shape, mean=0.0, dtype=torch.float32):
    return (torch.randn(*shape, dtype=torch.float64) + mean).to(dtype=dtype, device=DEVICE)


def strided(M, K, dtype, mean=0.0, pad=(3, 5)):
    """[M, K] as a column slice of a wider buffer (row stride K + 8, unaligned offset 3)."""
    return rand(M, K + sum(pad), mean=mean, dtype=dtype)[:, pad[0]:pad[0] + K]


def layer(K, N, *, bias=True, affine=False):
    w = {"weight": torch.randn(N, K) / math.sqrt(K), "bias": 0.5 * torch.randn(N) if bias else None}
    if affine:
        w["norm_weight"] = 1 + 0.2 * torch.randn(K)
        w["norm_bias"] = 0.2 * torch.randn(K)
    return w


def run(a, w, dt, **kw):
    packed = pack_linear(w["weight"], w["bias"], norm_weight=w.get("norm_weight"), norm_bias=w.get("norm_bias"),
                         dtype=dt, device=DEVICE)
    return linear(a, packed, **kw)


def ref(a, w, dt, **kw):
    def cast(t):
        return t.to(dt) if torch.is_tensor(t) else t

    return linear_reference(cast(a), w["weight"], w["bias"], norm_weight=w.get("norm_weight"),
                            norm_bias=w.get("norm_bias"), **{k: cast(v) for k, v in kw.items()})


def compare(out, a, w, what, **kw):
    """Kernel output against float64 and against PyTorch in the output's dtype (float32 logits of a pooled
    GEMM compare with PyTorch in the input's dtype)."""
    dt = a.dtype
    assert_within_torch_error(out, ref(a, w, torch.float64, **kw), ref(a, w, dt, **kw).to(out.dtype), what)


# -- epilogues --------------------------------------------------------------------------------------------

EPILOGUE_CASES = [  # (id, M, K, N, bias, act, residual, strided A)
    ("M1-K16-N24-plain", 1, 16, 24, False, None, False, False),
    ("M7-K24-N16-bias-silu", 7, 24, 16, True, "silu", False, False),
    ("M100-K129-N257-bias-res-strided", 100, 129, 257, True, None, True, True),
    ("M64-K257-N129-bias-silu-res-strided", 64, 257, 129, True, "silu", True, True),
    ("M100-K1025-N24-bias", 100, 1025, 24, True, None, False, False),
    ("M7-K16-N1025-bias-silu-res", 7, 16, 1025, True, "silu", True, False),
]


@pytest.mark.parametrize("dt", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", EPILOGUE_CASES, ids=lambda c: c[0])
def test_epilogues(case, dt):
    name, M, K, N, bias, act, res, strided_a = case
    a = strided(M, K, dt) if strided_a else rand(M, K, dtype=dt)
    w = layer(K, N, bias=bias)
    residual = strided(M, N, dt, pad=(1, 0)) if res else None  # the residual may be a strided view too
    out = run(a, w, dt, act=act, residual=residual)
    compare(out, a, w, f"{name}-{dtype_id(dt)}", act=act, residual=residual)


# -- LayerNorm prologue (v1 transformer) ------------------------------------------------------------------

LN_CASES = [  # (id, M, K, N, act, mean of the rows)
    ("M1-K16-N24-ln", 1, 16, 24, None, 0.0),
    ("M7-K129-N257-ln-silu-mean50", 7, 129, 257, "silu", 50.0),
    ("M100-K257-N129-ln-mean50", 100, 257, 129, None, 50.0),
    ("M64-K24-N16-ln-silu-mean-300", 64, 24, 16, "silu", -300.0),
]


@pytest.mark.parametrize("dt", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", LN_CASES, ids=lambda c: c[0])
def test_layernorm_prologue(case, dt):
    """Rows whose mean is large against their spread (residual streams) must not lose accuracy."""
    name, M, K, N, act, mean = case
    a = strided(M, K, dt, mean=mean)
    w = layer(K, N, affine=True)
    out = run(a, w, dt, norm="layer", act=act)
    compare(out, a, w, f"{name}-{dtype_id(dt)}", norm="layer", act=act)


# -- GroupNorm(1) statistics and prologue (v2 transformer) ------------------------------------------------

def produce(B, rps, K, N, dt, *, mean=0.0, residual=False):
    """A GEMM that emits per-sample statistics of its output (v2's conv_1x1, or fc2 + residual)."""
    a = rand(B * rps, K, dtype=dt)
    w = layer(K, N)
    w["bias"] = w["bias"] + mean
    res = rand(B * rps, N, dtype=dt) if residual else None
    y, stats = run(a, w, dt, residual=res, emit_group_stats=True, rows_per_sample=rps)
    return y, stats


GN_CASES = [  # (id, B, rows per sample, d, N, act, mean)
    ("B1-R7-K24-N129-gn", 1, 7, 24, 129, None, 0.0),
    ("B3-R24-K129-N257-gn-silu-mean30", 3, 24, 129, 257, "silu", 30.0),
    ("B3-R100-K16-N24-gn-mean-30", 3, 100, 16, 24, None, -30.0),
]


@pytest.mark.parametrize("dt", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", GN_CASES, ids=lambda c: c[0])
def test_group_stats_and_prologue(case, dt):
    name, B, rps, K, N, act, mean = case
    what = f"{name}-{dtype_id(dt)}"
    x, stats = produce(B, rps, 32, K, dt, mean=mean, residual=True)
    # the emitted partials merge into the statistics of the stored values
    m64, v64 = group_stats_reference(x, rps)
    m32, v32 = x.float().reshape(B, -1).mean(1), x.float().reshape(B, -1).var(1, unbiased=False)
    m, v = (t.float() for t in finalize_group_stats(stats))
    assert_within_torch_error(m, m64, m32, what + "-mean")
    assert_within_torch_error(v, v64, v32, what + "-var")
    # and the consumer normalises with them
    w = layer(K, N, affine=True)
    out = run(x, w, dt, norm="group", group_stats=stats, rows_per_sample=rps, act=act)
    compare(out, x, w, what, norm="group", rows_per_sample=rps, act=act)


# -- pooling epilogue -------------------------------------------------------------------------------------

@pytest.mark.parametrize("dt", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("B,rps,K,N", [(3, 7, 24, 129), (1, 100, 129, 24)], ids=["B3-R7-K24-N129", "B1-R100-K129-N24"])
def test_pool_epilogue(B, rps, K, N, dt):
    """v1's final 1x1 conv (+ BN, SiLU) and mean pooling: [B, N] float32, y never written."""
    a = rand(B * rps, K, dtype=dt)
    w = layer(K, N)
    out = run(a, w, dt, act="silu", pool=True, rows_per_sample=rps)
    assert out.dtype == torch.float32 and out.shape == (B, N)
    compare(out, a, w, f"B{B}-R{rps}-K{K}-N{N}-silu-pool-{dtype_id(dt)}", act="silu", pool=True,
            rows_per_sample=rps)


@pytest.mark.parametrize("dt", DTYPES, ids=dtype_id)
def test_groupnorm_pool(dt):
    """v2's last conv_proj: final GroupNorm prologue and pooling epilogue together."""
    B, rps, K, N = 3, 20, 24, 40
    x, stats = produce(B, rps, 16, K, dt, mean=10.0)
    w = layer(K, N, affine=True)
    out = run(x, w, dt, norm="group", group_stats=stats, rows_per_sample=rps, pool=True)
    compare(out, x, w, f"B3-R20-K24-N40-gn-pool-{dtype_id(dt)}", norm="group", rows_per_sample=rps, pool=True)


# -- separable-attention prologue (v2 out_proj) -----------------------------------------------------------

@pytest.mark.parametrize("dt", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("B,H,W,d", [(3, 4, 6, 24), (1, 2, 2, 129)], ids=["B3-H4-W6-d24", "B1-H2-W2-d129"])
def test_relu_scale_prologue(B, H, W, d, dt):
    """out_proj as the engine runs it: A = the v columns of qkv, + bias + residual, statistics out."""
    M = B * H * W
    qkv = rand(M, 1 + 2 * d, dtype=dt)
    v = qkv[:, 1 + d:]
    cv = torch.randn(B, 4, d, device=DEVICE)
    residual = rand(M, d, dtype=dt)
    w = layer(d, d)
    out, stats = run(v, w, dt, relu_scale=cv, hw=(H, W), residual=residual, emit_group_stats=True,
                     rows_per_sample=H * W)
    what = f"B{B}-H{H}-W{W}-d{d}-relu_scale-res-{dtype_id(dt)}"
    compare(out, v, w, what, relu_scale=cv, hw=(H, W), residual=residual)
    m, var = finalize_group_stats(stats)
    m64, v64 = group_stats_reference(out, H * W)
    assert torch.allclose(m, m64, rtol=1e-5, atol=1e-6) and torch.allclose(var, v64, rtol=1e-4), what


# -- aligned rows whose K is not a multiple of 8: the K tail loads whole 8-column groups -------------------

@pytest.mark.parametrize("dt", DTYPES, ids=dtype_id)
def test_aligned_rows_ragged_k(dt):
    """A = the first K = 129 columns of a [M, 144] buffer (16-byte aligned rows): the tail step reads
    columns 129..135 too, which hold NaN and inf here and must not leak into the result."""
    M, K, N, H, W = 48, 129, 40, 4, 6
    buf = rand(M, 144, mean=10.0, dtype=dt)
    buf[:, K:] = float("nan")
    buf[:, K + 1::2] = float("inf")
    a = buf[:, :K]
    assert kg.is_aligned(a)
    tag = dtype_id(dt)
    w = layer(K, N)
    compare(run(a, w, dt, act="silu"), a, w, f"M48-K129-N40-aligned-tail-{tag}", act="silu")
    wn = layer(K, N, affine=True)
    compare(run(a, wn, dt, norm="layer"), a, wn, f"M48-K129-N40-aligned-tail-ln-{tag}", norm="layer")
    buf[:, :K] -= 10
    cv = torch.randn(M // (H * W), 4, K, device=DEVICE)
    compare(run(a, w, dt, relu_scale=cv, hw=(H, W)), a, w, f"M48-K129-N40-aligned-tail-relu-{tag}",
            relu_scale=cv, hw=(H, W))


# -- every tile path with small tiles: several K steps, N tiles, row tiles per sample, straddling tiles ----

SMALL = kg.GemmConfig(16, 16, 16, 4, 1)


@pytest.mark.parametrize("dt", DTYPES, ids=dtype_id)
def test_small_tiles(dt):
    B, rps, K, N = 3, 24, 57, 40  # row tiles of 16 straddle samples of 24 rows; K = 3 full steps + a tail
    M = B * rps
    a = strided(M, K, dt, mean=20.0)
    w = layer(K, N, affine=True)
    packed = pack_linear(w["weight"], w["bias"], norm_weight=w["norm_weight"], norm_bias=w["norm_bias"],
                         dtype=dt, device=DEVICE)
    res = rand(M, N, dtype=dt)
    tag = dtype_id(dt)
    y = kg.gemm(a, packed.weight, N, bias=packed.bias, norm=kg.NORM_LAYER, act=True, residual=res, config=SMALL)
    compare(y, a, w, f"small-ln-silu-res-{tag}", norm="layer", act="silu", residual=res)
    x, stats = kg.gemm(a, packed.weight, N, bias=packed.bias, emit_stats=True, rows_per_sample=rps, config=SMALL)
    assert stats.shape == (B, 3, 2 * 3)  # 2 row tiles per sample, 3 column tiles
    w2 = layer(N, 24, affine=True)
    p2 = pack_linear(w2["weight"], w2["bias"], norm_weight=w2["norm_weight"], norm_bias=w2["norm_bias"],
                     dtype=dt, device=DEVICE)
    z = kg.gemm(x, p2.weight, 24, bias=p2.bias, norm=kg.NORM_GROUP, group_stats=stats, rows_per_sample=rps,
                config=SMALL)
    compare(z, x, w2, f"small-gn-{tag}", norm="group", rows_per_sample=rps)
    pooled = kg.gemm(x, p2.weight, 24, bias=p2.bias, norm=kg.NORM_GROUP, group_stats=stats, rows_per_sample=rps,
                     pool=True, config=SMALL)
    compare(pooled, x, w2, f"small-gn-pool-{tag}", norm="group", rows_per_sample=rps, pool=True)
    cv = torch.randn(B, 4, K, device=DEVICE)
    plain = pack_linear(w["weight"], w["bias"], dtype=dt, device=DEVICE)
    r = kg.gemm(a - 20, plain.weight, N, bias=plain.bias, relu_scale=cv, hw=(4, 6), config=SMALL)
    compare(r, a - 20, {"weight": w["weight"], "bias": w["bias"]}, f"small-relu_scale-{tag}", relu_scale=cv,
            hw=(4, 6))


def test_group_stats_merge_over_more_slots_than_one_step():
    """The GroupNorm prologue merges a sample's partial statistics STATS_BLOCK slots per step: with small
    tiles a sample of 390 rows leaves 25 row tiles x 3 column tiles = 75 slots, so it takes two steps,
    and the second step's slots have means far from the first's (a dropped spread term or a lost step
    shows in the variance)."""
    B, rps, K, N = 2, 390, 16, 40
    a = rand(B * rps, K, dtype=torch.float32)
    a[: rps // 2] += 25.0  # the first half of sample 0's rows (its early slots) sit far above the rest
    w = layer(K, N)
    packed = pack_linear(w["weight"], w["bias"], dtype=torch.float32, device=DEVICE)
    x, stats = kg.gemm(a, packed.weight, N, bias=packed.bias, emit_stats=True, rows_per_sample=rps, config=SMALL)
    assert stats.shape[2] > kg.STATS_BLOCK.value
    w2 = layer(N, 24, affine=True)
    p2 = pack_linear(w2["weight"], w2["bias"], norm_weight=w2["norm_weight"], norm_bias=w2["norm_bias"],
                     dtype=torch.float32, device=DEVICE)
    z = kg.gemm(x, p2.weight, 24, bias=p2.bias, norm=kg.NORM_GROUP, group_stats=stats, rows_per_sample=rps,
                config=SMALL)
    compare(z, x, w2, "many-slots-gn", norm="group", rows_per_sample=rps)


# -- one v1 transformer layer's GEMMs against fastmvit.model.blocks.TransformerLayer ---------------------

def _attention(qkv, seqs, heads):
    """Plain-PyTorch stand-in for the attention kernel: [S*N, 3d] -> [S*N, d], in qkv's dtype."""
    n = qkv.shape[0] // seqs
    d = qkv.shape[1] // 3
    q, k, v = qkv.reshape(seqs, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4).unbind(0)
    o = ((q * (d // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1) @ v
    return o.transpose(1, 2).reshape(seqs * n, d)


@pytest.mark.parametrize("dt", DTYPES, ids=dtype_id)
def test_v1_transformer_layer(dt):
    torch.manual_seed(1)
    spec = TransformerSpec(dim=36, depth=1, ffn_dim=72, heads=4)
    mod = TransformerLayer(spec).eval()
    with torch.no_grad():
        for name, p in mod.named_parameters():
            is_gain = name.endswith(("norm1.weight", "norm2.weight"))
            p.copy_(float(is_gain) + (0.2 if "norm" in name else 0.3) * torch.randn_like(p))
    seqs, n = 8, 9  # B = 2 images, 4 patch positions, 3x3 patches
    x = (torch.randn(seqs, n, spec.dim, dtype=torch.float64) + 20).to(dt)  # residual stream with a large mean

    def pack(lin, norm=None):
        return pack_linear(lin.weight, lin.bias, norm_weight=None if norm is None else norm.weight,
                           norm_bias=None if norm is None else norm.bias, dtype=dt, device=DEVICE)

    with torch.no_grad():
        t = x.reshape(seqs * n, spec.dim).to(DEVICE)
        qkv = linear(t, pack(mod.attn.qkv, mod.norm1), norm="layer")
        t = linear(_attention(qkv, seqs, spec.heads), pack(mod.attn.proj), residual=t)
        h = linear(t, pack(mod.mlp.fc1, mod.norm2), norm="layer", act="silu")
        t = linear(h, pack(mod.mlp.fc2), residual=t)
        ref64 = mod.double()(x.double()).reshape(seqs * n, spec.dim)
        same = mod.to(dt)(x).reshape(seqs * n, spec.dim)
    assert_within_torch_error(t.cpu(), ref64, same, f"v1-layer-d36-{dtype_id(dt)}")


# -- every GEMM the engine launches for a variant (all variants at 256x256 on a GPU, a small CPU smoke) ---

ENGINE_CASES = ([(name, 256, 2, dt) for name in VARIANTS for dt in DTYPES] if ON_GPU
                else [("xxs", 64, 1, torch.float32), ("v2-0.5", 64, 1, torch.float16)])


@pytest.mark.parametrize("name,size,batch,dt", ENGINE_CASES,
                         ids=[f"{n}-{s}px-B{b}-{dtype_id(d)}" for n, s, b, d in ENGINE_CASES])
def test_engine_calls(name, size, batch, dt):
    """Each call of kg.engine_calls with its flags and shapes (the layouts the engine uses: v2's out_proj
    reads the v columns of a padded k | v | q buffer) against the reference."""
    for c in kg.engine_calls(VARIANTS[name], batch, size):
        M, K, N, rps = c["M"], c["K"], c["N"], c["rows"]
        what = f"{name}-M{M}-K{K}-N{N}-" + "-".join(k for k in sorted(c) if k not in ("M", "K", "N", "rows"))
        w = layer(K, N, affine=bool(c.get("norm")), bias=c.get("bias", False))
        kw = dict(act="silu" if c.get("act") else None, rows_per_sample=rps)
        if c.get("relu_scale"):
            a = rand(M, 2 * K + 16, dtype=dt)[:, K:2 * K]
            kw.update(relu_scale=torch.randn(M // rps, 4, K, device=DEVICE), hw=(int(rps ** 0.5),) * 2)
        elif c.get("norm") == kg.NORM_GROUP:
            a, stats = produce(M // rps, rps, 16, K, dt, mean=5.0)
            kw.update(norm="group", group_stats=stats)
        else:
            a = rand(M, K, mean=5.0 if c.get("norm") else 0.0, dtype=dt)
            kw.update(norm="layer" if c.get("norm") else None)
        if c.get("res"):
            kw["residual"] = rand(M, N, dtype=dt)
        out = run(a, w, dt, emit_group_stats=c.get("stats", False), pool=c.get("pool", False), **kw)
        if c.get("stats"):
            out, stats = out
            m, v = (t.float() for t in finalize_group_stats(stats))
            m64, v64 = group_stats_reference(out, rps)
            assert_within_torch_error(v, v64, out.float().reshape(M // rps, -1).var(1, unbiased=False), what)
        kw.pop("group_stats", None)
        compare(out, a, w, what, pool=c.get("pool", False), **kw)


# -- packing, validation, registration ---------------------------------------------------------------------

def test_pack_linear_layout():
    w = torch.randn(129, 24, 1, 1)
    g, b = torch.randn(24), torch.randn(24)
    p = pack_linear(w, None, norm_weight=g, norm_bias=b, dtype=torch.float16, device=DEVICE, pad_output=True)
    assert p.weight.shape == (24, 144) and p.weight.is_contiguous() and p.out_stride == 144
    assert (p.weight[:, 129:] == 0).all()
    w64 = w.flatten(1).double()
    assert torch.allclose(p.weight[:, :129].double(), (w64 * g.double()).t().half().double())
    assert torch.allclose(p.bias.double(), w64 @ b.double(), rtol=1e-6, atol=1e-6)
    assert pack_linear(torch.randn(16, 8), dtype=torch.float32).bias is None
    a = rand(5, 24, dtype=torch.float16)
    y = linear(a, p)
    assert y.shape == (5, 129) and y.stride() == (144, 1)


@pytest.mark.parametrize("dt", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("M,K,N,norm", [(5, 24, 129, None), (37, 48, 33, "layer")], ids=["M5-K24-N129", "M37-K48-N33-ln"])
def test_padded_rows_are_stored_whole(M, K, N, norm, dt):
    """pad_output (v2's qkv rows): the store runs to the padded row stride (whole 16-byte vectors), writing
    zeros in the padding columns (W is zero-padded) and the reference in the N columns. Outputs start NaN."""
    w = layer(K, N, affine=norm is not None)
    p = pack_linear(w["weight"], w["bias"], norm_weight=w.get("norm_weight"), norm_bias=w.get("norm_bias"),
                    dtype=dt, device=DEVICE, pad_output=True)
    a = rand(M, K, dtype=dt)
    y = linear(a, p, act="silu", norm=norm)
    assert y.shape == (M, N) and y.stride() == (p.out_stride, 1) and p.out_stride > N
    rows = y.as_strided((M, p.out_stride), (p.out_stride, 1))
    assert (rows[:, N:] == 0).all(), "the padding columns were not stored"
    compare(y, a, w, f"padded-{M}x{N}", act="silu", norm=norm)


_PAD_STORE_PTX = """
import dataclasses, json
from fastmvit.kernels import gemm
from fastmvit.kernels.check import resource_usage
cfg = next(c for c in gemm.compile_configs() if c.name.startswith("gemm-fp16-gn-bias-padstore-64x128x64"))
off = dataclasses.replace(cfg, constexprs={**cfg.constexprs, "PAD_STORE": False})
print(json.dumps([resource_usage(cfg, 90), resource_usage(off, 90)]))
"""


def test_padded_store_compiles_to_16_byte_stores():
    """v2's qkv GEMM (fp16, GroupNorm prologue, sm_90): masking the store at the padded row stride turns the
    scalar stores of a [64, 128] tile into 16-byte ones (8 more v4 accesses a thread), without spills."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    run = subprocess.run([sys.executable, "-c", _PAD_STORE_PTX], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    padded, plain = json.loads(run.stdout.strip().splitlines()[-1])
    assert padded["stack"] == 0 and padded["v4"] >= plain["v4"] + 8


def test_validation():
    p = pack_linear(torch.randn(16, 24), torch.randn(16), dtype=torch.float32, device=DEVICE)
    a = rand(12, 24)
    with pytest.raises(ValueError, match="must match"):
        linear(a.half(), p)
    with pytest.raises(ValueError, match="channels"):
        linear(rand(12, 20), p)
    with pytest.raises(ValueError, match="rows_per_sample"):
        linear(a, p, emit_group_stats=True, rows_per_sample=5)
    with pytest.raises(ValueError, match="group_stats"):
        linear(a, p, norm="group", rows_per_sample=6)
    with pytest.raises(ValueError, match="exclude"):
        linear(a, p, emit_group_stats=True, pool=True, rows_per_sample=6)
    with pytest.raises(ValueError, match="relu_scale"):
        linear(a, p, relu_scale=torch.randn(1, 4, 24), hw=(3, 4))
    with pytest.raises(ValueError, match="act"):
        linear(a, p, act="relu")
    with pytest.raises(RuntimeError, match="inference-only"):
        linear(a.clone().requires_grad_(), p)
    a_copy = rand(12, 48)[:, ::2]  # column stride 2: copied, still correct
    assert torch.allclose(linear(a_copy, p), linear(a_copy.contiguous(), p))


# The interpreter cannot run under AOT dispatch's functional tensors: that part of opcheck needs a GPU.
OPCHECK_UTILS = None if ON_GPU else ("test_schema", "test_autograd_registration", "test_faketensor")


def test_opcheck():
    p = pack_linear(torch.randn(24, 16), torch.randn(24), dtype=torch.float32, device=DEVICE)
    a = rand(12, 16)
    for op, args in (
        (torch.ops.fastmvit.linear.default,
         (a, p.weight, 24, p.bias, rand(12, 24), True, 0, None, 0, None, 0, 0, 1e-5, 32)),
        (torch.ops.fastmvit.linear_group_stats.default,
         (a, p.weight, 24, p.bias, None, False, 0, None, 6, None, 0, 0, 1e-5, 24)),
        (torch.ops.fastmvit.linear_pool.default,
         (a, p.weight, 24, p.bias, None, True, 0, None, 4, None, 0, 0, 1e-5, 24)),
    ):
        torch.library.opcheck(op, args, test_utils=OPCHECK_UTILS or torch.library._OPCHECK_DEFAULT_UTILS)


def test_compile_configs_cover_the_engine():
    cfgs = kg.compile_configs()
    names = [c.name for c in cfgs]
    assert len(names) == len(set(names))
    for flag in ("EMIT_STATS", "POOL", "RELU_SCALE"):
        assert any(c.constexprs[flag] for c in cfgs), flag
    assert {c.constexprs["NORM"] for c in cfgs} == {0, 1, 2}
