"""MobileViTv2's separable-attention context (fastmvit.ops.sepattn) against its reference, and one whole v2
transformer layer composed from fastmvit's ops against fastmvit.model.blocks.LinearTransformerLayer."""
import pytest
import torch

from fastmvit.kernels import sepattn as ks
from fastmvit.model.blocks import PATCH, LinearTransformerLayer
from fastmvit.ops.gemm import linear, linear_reference, pack_linear
from fastmvit.ops.sepattn import pack_qkv, qkv_columns, sepattn_context, sepattn_context_reference
from fastmvit.variants import TransformerSpec
from tests.kernels.common import DEVICE, DTYPES, ON_GPU, assert_within_torch_error, dtype_id


def make_qkv(B, H, W, d, dt, extra=0):
    """[B*H*W, 1 + 2d + extra] with a query spread wide enough to make the softmax peaked."""
    qkv = torch.randn(B * H * W, 1 + 2 * d + extra, dtype=torch.float64)
    qkv[:, 0] *= 6
    return qkv.to(dtype=dt, device=DEVICE)


CASES = [  # (B, H, W, d): N = H*W/4 pixels per sequence
    (1, 2, 2, 64),     # N = 1
    (3, 6, 10, 129),   # odd width, N = 15
    (2, 16, 12, 24),   # N = 48
    (1, 4, 4, 512),
]


@pytest.mark.parametrize("dt", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("B,H,W,d", CASES, ids=[f"B{b}-H{h}-W{w}-d{d}" for b, h, w, d in CASES])
def test_context(B, H, W, d, dt):
    qkv = make_qkv(B, H, W, d, dt, extra=3)[:, :1 + 2 * d]  # rows of a wider buffer: stride 2d + 4
    cv = sepattn_context(qkv, d, H, W)
    assert cv.shape == (B, 4, d) and cv.dtype == torch.float32
    assert_within_torch_error(cv, sepattn_context_reference(qkv.double(), d, H, W),
                              sepattn_context_reference(qkv, d, H, W), f"B{B}-H{H}-W{W}-d{d}-{dtype_id(dt)}")


@pytest.mark.parametrize("dt", DTYPES, ids=dtype_id)
def test_context_chunks_and_layouts(dt):
    """Several online-softmax chunks and channel blocks; 4-D input; the k | v | q layout of pack_qkv."""
    B, H, W, d = 2, 10, 14, 40  # N = 35: 5 chunks of 8 pixels, 3 channel blocks of 16
    qkv = make_qkv(B, H, W, d, dt)
    ref64 = sepattn_context_reference(qkv.double(), d, H, W)
    same = sepattn_context_reference(qkv, d, H, W)
    what = f"B{B}-H{H}-W{W}-d{d}-{dtype_id(dt)}"
    assert_within_torch_error(ks.context(qkv, d, H, W, blocks=(8, 16)), ref64, same, what + "-chunks")
    assert_within_torch_error(sepattn_context(qkv.reshape(B, H, W, -1), d), ref64, same, what + "-4d")
    kvq = torch.cat([qkv[:, 1:], qkv[:, :1], torch.zeros_like(qkv[:, :7])], dim=1)  # padded k | v | q
    assert_within_torch_error(sepattn_context(kvq, d, H, W, **qkv_columns(d)), ref64, same, what + "-kvq")


def test_pack_qkv_layout():
    d = 24
    w, b = torch.randn(1 + 2 * d, d, 1, 1), torch.randn(1 + 2 * d)
    g, beta = 1 + torch.randn(d) * 0.1, torch.randn(d) * 0.1
    x = torch.randn(20, d, device=DEVICE)
    y = linear(x, pack_qkv(w, b, norm_weight=g, norm_bias=beta, device=DEVICE), norm="layer")
    assert y.shape == (20, 1 + 2 * d) and y.stride() == (64, 1)
    ref = linear_reference(x.double(), w.double(), b.double(), norm="layer", norm_weight=g.double(),
                           norm_bias=beta.double())
    order = torch.cat([torch.arange(1, 1 + 2 * d), torch.zeros(1, dtype=torch.long)])
    assert torch.allclose(y.double().cpu(), ref[:, order].cpu(), atol=1e-5)


def test_validation_and_opcheck():
    qkv = make_qkv(1, 4, 4, 16, torch.float32)
    with pytest.raises(ValueError, match="even"):
        sepattn_context(qkv, 16, 2, 3)
    with pytest.raises(ValueError, match="fit"):
        sepattn_context(qkv, 40, 4, 4)
    with pytest.raises(ValueError, match="H and W"):
        sepattn_context(qkv, 16)
    with pytest.raises(RuntimeError, match="inference-only"):
        sepattn_context(qkv.clone().requires_grad_(), 16, 4, 4)
    utils = None if ON_GPU else ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.fastmvit.sepattn_context.default, (qkv, 16, 4, 4, 0, 1),
                          test_utils=utils or torch.library._OPCHECK_DEFAULT_UTILS)


# -- one v2 transformer layer: conv_1x1 -> GN1 -> qkv -> context -> out_proj + res -> GN2 -> fc1 -> fc2 + res -

def to_patches(x, B, H, W):
    """NHWC token matrix [B*H*W, d] -> the reference's [B, d, 4, N] (p = i*2 + j, n = r*(W/2) + c)."""
    d = x.shape[1]
    return x.reshape(B, H // PATCH, PATCH, W // PATCH, PATCH, d).permute(0, 5, 2, 4, 1, 3).reshape(
        B, d, PATCH * PATCH, -1)


def from_patches(p, H, W):
    B, d = p.shape[:2]
    return p.reshape(B, d, PATCH, PATCH, H // PATCH, W // PATCH).permute(0, 4, 2, 5, 3, 1).reshape(-1, d)


@pytest.mark.parametrize("dt", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("layout", ["kvq", "checkpoint"])
def test_v2_transformer_layer(layout, dt):
    torch.manual_seed(2)
    B, H, W, C, d = 2, 4, 6, 16, 24
    spec = TransformerSpec(dim=d, depth=1, ffn_dim=2 * d, heads=1)
    mod = LinearTransformerLayer(spec).eval()
    with torch.no_grad():
        for name, p in mod.named_parameters():
            is_gain = name.endswith(("norm1.weight", "norm2.weight"))
            p.copy_(float(is_gain) + (0.2 if "norm" in name else 0.3) * torch.randn_like(p))
    conv = torch.randn(d, C) / C ** 0.5  # the block's conv_1x1 that produces the layer's input
    x_in = (torch.randn(B * H * W, C, dtype=torch.float64) + 3).to(dt)
    rps = H * W

    def pack(m, norm=None):
        return pack_linear(m.weight, m.bias, norm_weight=None if norm is None else norm.weight,
                           norm_bias=None if norm is None else norm.bias, dtype=dt, device=DEVICE)

    with torch.no_grad():
        x, s = linear(x_in.to(DEVICE), pack_linear(conv, dtype=dt, device=DEVICE), emit_group_stats=True,
                      rows_per_sample=rps)
        if layout == "kvq":
            qkv = linear(x, pack_qkv(mod.attn.qkv_proj.weight, mod.attn.qkv_proj.bias, norm_weight=mod.norm1.weight,
                                     norm_bias=mod.norm1.bias, dtype=dt, device=DEVICE),
                         norm="group", group_stats=s, rows_per_sample=rps)
            cv, v = sepattn_context(qkv, d, H, W, **qkv_columns(d)), qkv[:, d:2 * d]
        else:
            qkv = linear(x, pack(mod.attn.qkv_proj, mod.norm1), norm="group", group_stats=s, rows_per_sample=rps)
            cv, v = sepattn_context(qkv, d, H, W), qkv[:, 1 + d:]
        x, s = linear(v, pack(mod.attn.out_proj), relu_scale=cv, hw=(H, W), residual=x, emit_group_stats=True,
                      rows_per_sample=rps)
        h = linear(x, pack(mod.mlp.fc1, mod.norm2), norm="group", group_stats=s, rows_per_sample=rps, act="silu")
        x, s = linear(h, pack(mod.mlp.fc2), residual=x, emit_group_stats=True, rows_per_sample=rps)

        def reference(dtype):
            t = torch.nn.functional.linear(x_in.to(dtype), conv.to(dtype))
            return from_patches(mod.to(dtype)(to_patches(t, B, H, W)), H, W)

        ref64, same = reference(torch.float64), reference(dt)
    assert_within_torch_error(x.cpu(), ref64, same, f"v2-layer-{layout}-d{d}-{dtype_id(dt)}")
    # the statistics the next layer's GroupNorm would read
    assert_within_torch_error(s[:, 1].mul(s[:, 0]).sum(1).div(s[:, 0].sum(1)).cpu(),
                              ref64.reshape(B, -1).mean(1), same.float().reshape(B, -1).mean(1),
                              f"v2-layer-{layout}-stats-{dtype_id(dt)}")
