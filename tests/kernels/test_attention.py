"""fastmvit::patch_attention (unfold + multi-head attention + fold) against its eager reference.

On CPU the kernel runs under TRITON_INTERPRET=1 at small but awkward shapes (every v1 head dim, N = 1, 16,
63 on a 7x9 patch grid, 64, 256 and one N > 1000); on a GPU the same tests run at full size.
"""

import pytest
import torch
import torch.nn.functional as F

from fastmvit.kernels import attention as K
from fastmvit.model.blocks import TransformerLayer, unfold_patches
from fastmvit.ops.attention import patch_attention, patch_attention_reference
from fastmvit.variants import TransformerSpec
from tests.kernels.common import (DEVICE, DTYPES, ON_GPU, assert_within_torch_error, compiled_resources, dtype_id,
                                  poison)
from tests.utils import randomize_

HEAD_DIMS = (16, 20, 24, 30, 36, 48, 60)
# N -> (H, W) of the NHWC map: N = (H/2) * (W/2); 63 is a non-square 7x9 patch grid.
GRIDS = {1: (2, 2), 16: (8, 8), 63: (14, 18), 64: (16, 16), 100: (20, 20), 256: (32, 32), 1024: (64, 64),
         1056: (64, 66)}


def _case_id(B, N, heads, hd, dtype):
    return f"B{B}-N{N}-H{heads}-D{hd}-{dtype_id(dtype)}"


def _qkv(B, N, heads, hd, dtype, seed=0):
    H, W = GRIDS[N]
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    # x1.5: a sharper softmax than unit scores, closer to a trained model's attention
    return (1.5 * torch.randn(B, H, W, 3 * heads * hd, generator=g, device=DEVICE)).to(dtype)


def _check(B, N, heads, hd, dtype, config=None):
    qkv = _qkv(B, N, heads, hd, dtype)
    out = poison(torch.empty(*qkv.shape[:3], heads * hd, device=DEVICE, dtype=dtype))
    assert K.patch_attention(qkv, heads, out=out, config=config) is out
    assert_within_torch_error(out, patch_attention_reference(qkv.double(), heads),
                              patch_attention_reference(qkv, heads), _case_id(B, N, heads, hd, dtype))


def _cases():
    if ON_GPU:  # full size; N = 1024 at batch 8 keeps the float64 reference's scores at 1 GB
        return [(B, N, hd, dt) for N in (1, 16, 63, 64, 256, 1024) for B in ((1, 8) if N == 1024 else (1, 64))
                for hd in HEAD_DIMS for dt in DTYPES]
    # Under the interpreter every head dim meets two token counts (one per dtype), every token count meets
    # several head dims in both dtypes, and batches 1 and 3 alternate; plus one long sequence.
    token_counts = (1, 16, 63, 64, 256)
    cases = []
    for i, hd in enumerate(HEAD_DIMS):
        for k, dt in enumerate(DTYPES[:2]):
            N = token_counts[(i + 2 * k) % len(token_counts)]
            cases.append((1 if N == 256 else (1, 3)[(i + k) % 2], N, hd, dt))
    return cases + [(1, 1056, 16, torch.float32)]  # 9 key blocks, the last one partial


@pytest.mark.parametrize("B,N,hd,dtype", [pytest.param(*c, id=_case_id(c[0], c[1], 4, c[2], c[3])) for c in _cases()])
def test_against_reference(B, N, hd, dtype):
    _check(B, N, 4, hd, dtype)


def _gpu_tile_cases():
    """The GPU tiles, forced under the interpreter too: packed groups, 32-row fp32 tiles, 128/64-query
    programs with 64-, 32- and 16-key steps over several blocks."""
    out = []
    for B, N, hd, dt in ((3, 1, 24, torch.float16), (2, 16, 36, torch.float16), (1, 16, 60, torch.float32),
                         (1, 63, 20, torch.float16), (1, 100, 48, torch.float32), (1, 100, 24, torch.float32),
                         (1, 100, 30, torch.float16)):
        for cfg in K.gpu_configs(N, dt, hd):
            tag = f"M{cfg.BLOCK_M}xN{cfg.BLOCK_N}G{cfg.G}"
            out.append(pytest.param(B, N, hd, dt, cfg, id=f"{_case_id(B, N, 4, hd, dt)}-{tag}"))
    return out


@pytest.mark.parametrize("B,N,hd,dtype,config", _gpu_tile_cases())
def test_gpu_tiles(B, N, hd, dtype, config):
    _check(B, N, 4, hd, dtype, config)


def test_strided_views_and_copy():
    """Pixel strides other than the channel count (channel slices of wider buffers) are read and written in
    place; an input whose channel stride is not 1 is copied first."""
    B, N, heads, hd, dtype = 2, 63, 4, 20, torch.float32
    d = heads * hd
    wide = _qkv(B, N, heads, hd + 2, dtype)                  # 3*88 channels, q|k|v taken from 4 onwards
    qkv = wide[..., 4:4 + 3 * d]
    out_wide = poison(torch.empty(*qkv.shape[:3], d + 12, device=DEVICE, dtype=dtype))
    out = out_wide[..., 8:8 + d]
    K.patch_attention(qkv, heads, out=out)
    ref64 = patch_attention_reference(qkv.double(), heads)
    assert_within_torch_error(out, ref64, patch_attention_reference(qkv, heads), "strided")
    assert torch.isnan(out_wide[..., :8]).all() and torch.isnan(out_wide[..., 8 + d:]).all(), "wrote outside out"

    nchw = qkv.permute(0, 3, 1, 2).contiguous()              # channel stride H*W: copied
    got = K.patch_attention(nchw.permute(0, 2, 3, 1), heads)
    assert_within_torch_error(got, ref64, patch_attention_reference(qkv, heads), "channel-strided")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_transformer_attention_subblock(dtype):
    """The op between a plain-PyTorch qkv and proj on the NHWC map reproduces TransformerLayer's
    x + attn(norm1(x)) on the unfolded sequences: the pixel <-> (sequence, token) mapping is the model's."""
    B, H, W, d = (8, 32, 32, 144) if ON_GPU else (2, 14, 18, 144)
    layer = randomize_(TransformerLayer(TransformerSpec(dim=d, depth=1, ffn_dim=2 * d, heads=4))).eval()
    y = torch.randn(B, d, H, W, generator=torch.Generator().manual_seed(3))

    def model(y, layer):
        x = unfold_patches(y)
        return x + layer.attn(layer.norm1(x))

    def fused(y, layer):
        x = y.permute(0, 2, 3, 1).contiguous()
        n, a = layer.norm1, layer.attn
        qkv = F.linear(F.layer_norm(x, (d,), n.weight, n.bias, n.eps), a.qkv.weight, a.qkv.bias)
        x = x + F.linear(patch_attention(qkv, a.heads), a.proj.weight, a.proj.bias)
        return unfold_patches(x.permute(0, 3, 1, 2))

    with torch.no_grad():
        ref64 = model(y.double(), layer.double())
        layer_dt, y_dt = layer.to(DEVICE, dtype), y.to(DEVICE, dtype)
        assert_within_torch_error(fused(y_dt, layer_dt), ref64.to(DEVICE), model(y_dt, layer_dt), "sub-block")


def test_registered_op_and_opcheck():
    qkv = _qkv(2, 16, 4, 24, torch.float32)
    op = torch.ops.fastmvit.patch_attention
    assert torch.equal(op(qkv, 4), K.patch_attention(qkv, 4))
    # Under the interpreter wrap_triton cannot trace a kernel into a graph, so the AOT-dispatch check
    # needs a GPU; the schema, autograd registration and fake (meta) kernel are checked everywhere.
    kw = {} if ON_GPU else {"test_utils": ("test_schema", "test_autograd_registration", "test_faketensor")}
    torch.library.opcheck(op.default, (qkv, 4), **kw)


def test_gradients_are_refused():
    qkv = _qkv(1, 16, 4, 16, torch.float32).requires_grad_()
    with pytest.raises(RuntimeError, match="inference-only"):
        patch_attention(qkv, 4).sum().backward()


@pytest.mark.parametrize("shape,heads,dtype,error", [
    ((1, 6, 7, 3 * 64), 4, torch.float32, ValueError),   # odd W
    ((1, 6, 8, 3 * 64 + 3), 4, torch.float32, ValueError),  # not q | k | v
    ((1, 6, 8, 3 * 66), 4, torch.float32, ValueError),   # d = 66 does not split into 4 heads
    ((6, 8, 3 * 64), 4, torch.float32, ValueError),      # not 4-D
    ((1, 6, 8, 3 * 64), 4, torch.int32, TypeError),
], ids=["odd-W", "channels", "heads", "3d", "int32"])
def test_rejects(shape, heads, dtype, error):
    with pytest.raises(error):
        K.patch_attention(torch.zeros(shape, dtype=dtype, device=DEVICE), heads)


def test_empty_batch():
    assert K.patch_attention(torch.zeros(0, 4, 4, 48, device=DEVICE), 4).shape == (0, 4, 4, 16)


def test_launch_rules():
    """Every GPU tile is a legal tl.dot shape and a packed tile holds whole sequences."""
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for hd in HEAD_DIMS:
            for N in list(range(1, 130)) + [255, 256, 257, 1023, 1024, 1056, 4096]:
                for c in K.gpu_configs(N, dtype, hd):
                    assert all(v >= 16 and v & (v - 1) == 0 for v in (c.BLOCK_M, c.BLOCK_N)), c
                    assert c.BLOCK_M % c.G == 0 and c.BLOCK_N % c.G == 0, c
                    assert c.G == 1 or c.BLOCK_N // c.G >= N, (N, c)


def test_compile_configs_cover_the_family():
    names = [c.name for c in K.compile_configs()]
    assert len(names) == len(set(names))
    for hd in HEAD_DIMS:
        for t in ("fp32", "fp16", "bf16"):
            assert any(f"-hd{hd}-" in n and n.endswith(t) for n in names), (hd, t)


def test_compiles_for_sm90_without_spills():
    """The heaviest specialisations (the full set: ``python -m fastmvit.kernels check``) compiled ahead of
    time for sm_90: no spills, Hopper warpgroup MMAs except in the 32-row float32 tiles."""
    names = ["patch_attention-" + n for n in ("hd36-M64-N16-G1-w4-s2-fp32", "hd60-M32-N32-G2-w4-s1-fp32",
                                              "hd36-M64-N64-G1-w4-s2-fp16", "hd60-M64-N64-G4-w4-s1-bf16")]
    for use in compiled_resources(K.__name__, names):
        assert use["stack"] == 0, f"{use['name']}: {use['stack']} bytes of spills"
        assert use["wgmma"] > 0 or "-M32-" in use["name"], f"{use['name']}: no Hopper warpgroup MMA"
