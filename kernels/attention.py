"""MobileViT v1 attention on 2x2-patch sequences, read from and written to NHWC maps in place.

A v1 block unfolds ``[B, d, H, W]`` into ``B*4`` sequences of ``N = H*W/4`` tokens (sequence
``b*4 + i*2 + j`` is the pixel set ``(2r+i, 2c+j)``, token ``r*(W/2) + c``), runs a transformer and folds
back. With NHWC activations everything but the attention is per pixel, so the unfold and fold are only
this kernel's index arithmetic: it gathers a sequence's q/k/v rows straight from the packed qkv map and
scatters the output to the same pixels.

Work partitioning (reasoned for an H100, not measured: no GPU was available to this work). Per SM and
clock an H100 SXM offers ~4096 dense fp16 tensor flops, 16 exp2 (MUFU), 128 fp32 lanes and ~14.5 bytes of
DRAM bandwidth. Per score the softmax costs one exp2 and ~5 fp32 ops (~0.06-0.1 clk), the two products
4 * HD_PAD flops (HD_PAD / 1024 clk); a (sequence, head) group moves 4 * N * hd elements (q, k, v, out).
One program owns ``BLOCK_M`` query rows and streams keys in steps of ``BLOCK_N`` with an online softmax:

* N <= 32 (layer5 at 256: N = 16): a 64-row tile packs ``G = 64 / pow2(N)`` whole groups, the heads of
  one sequence side by side (groups are ordered b, i, j, head), and the scores are one 64x64 block with
  the cross-group entries masked. That computes G x the needed scores, but one such program (4 groups
  at N = 16) spends ~260 clk of exp2 against 850-2100 clk of its 12-30 KB of bytes: memory-bound anyway,
  where one program per 16-token group would leave 3/4 of every MMA tile, warp and launch idle.
  Packing heads also makes a program read whole d-channel pixel rows.
* 32 < N <= 64 (layer4 at 256, layer5 at 512: N = 64): one group fills a 64x64 tile exactly, one step.
  ~260 clk of exp2 against 700-1700 clk of bytes: memory-bound.
* N > 64 (layer3 at 256: N = 256; layers 3-4 at 512: N = 1024, 256): one group per program, 64-key steps.
  At N = 256 a group costs ~4-6k clk of softmax against 2.3-5k clk of bytes; at N = 1024 the softmax
  (65k clk) dominates the bytes (9-20k) 3x or more. K/V re-reads from L2 grow as N^2 / BLOCK_M, so
  ``BLOCK_M = 128`` (8 warps, two warpgroups) once the grid still fills the GPU twice, else 64 (4 warps)
  to keep small batches spread over the SMs.
* Head dims are padded to a power of two (>= 16, the tl.dot minimum) with masks: masked lanes are never
  fetched, so the pad costs only tensor-core work, which is below the exp2 cost for HD_PAD <= 32
  (hd 16-30) and about equal to it at HD_PAD = 64. Splitting 36 and 48 into 32 + 16 would cut that
  work by a quarter (~10 % of this kernel at N >= 256 for hd 36/48 if the tensor and softmax work do
  not overlap, nothing if they do) for two extra dots and loads per step: left until a GPU can measure it.

Numerics follow ml-cvnets / timm: q is scaled by hd**-0.5 and rounded to the input dtype before the
q k^T product (as eager PyTorch does), the softmax runs in fp32 in base 2 with fp32 accumulation,
float16/bfloat16 operands go to tl.dot (P is rounded to the input dtype, as eager PyTorch's softmax
output is), and float32 inputs use 3xTF32 dots: ~fp32 accuracy on tensor cores, where plain TF32 would
miss float32 accuracy by ~1000x and IEEE FMA dots spill their operands at these tile sizes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import TRITON_DTYPE, CompileConfig, Launch, empty_output, interpreting, poisoning, sm_count

__all__ = ["AttentionConfig", "gpu_configs", "launch_config", "patch_attention", "compile_configs"]

LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x * LOG2E)


@triton.jit(do_not_specialize=["n_groups", "N", "nw", "sq_b", "sq_h", "sq_w", "so_b", "so_h", "so_w"])
def _patch_attention_kernel(
    qkv, out,                       # [B, H, W, 3*D] and [B, H, W, D], channel stride 1
    n_groups, N, nw,                # B*4*HEADS (sequence, head) groups; tokens per sequence; W / 2
    sq_b, sq_h, sq_w,               # qkv strides in elements (multiples of ALIGN_Q)
    so_b, so_h, so_w,               # out strides in elements (multiples of ALIGN_O)
    scale,                          # HD ** -0.5
    HEADS: tl.constexpr, HD: tl.constexpr, HD_PAD: tl.constexpr,
    G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ALIGN_Q: tl.constexpr, ALIGN_O: tl.constexpr,
):
    # Group g = ((b*2 + i)*2 + j)*HEADS + head; its token t = r*nw + c lives at pixel (2r + i, 2c + j).
    # The index maths is inlined (no helper functions): the interpreter pays ~10 ms per helper call.
    # Pixel offsets within one image fit int32; the batch term is int64 (B*H*W*3d can pass 2^31).
    D: tl.constexpr = HEADS * HD
    ROWS: tl.constexpr = BLOCK_M // G   # query tokens of one group in this tile
    KEYS: tl.constexpr = BLOCK_N // G   # key tokens of one group per step
    dt = qkv.dtype.element_ty

    pid = tl.program_id(0)
    m_tiles = tl.cdiv(N, ROWS)
    group0 = (pid // m_tiles) * G

    e = tl.arange(0, HD_PAD)
    e_ok = e < HD

    r = tl.arange(0, BLOCK_M)
    q_lg = r // ROWS                               # local group of each query row
    q_tok = (pid % m_tiles) * ROWS + r % ROWS
    q_grp = group0 + q_lg
    q_ok = (q_grp < n_groups) & (q_tok < N)
    q_seq = q_grp // HEADS
    q_b = (q_seq // 4).to(tl.int64)
    q_y = 2 * (q_tok // nw) + (q_seq // 2) % 2
    q_x = 2 * (q_tok % nw) + q_seq % 2
    q_head = (q_grp % HEADS) * HD
    q_off = tl.multiple_of(q_b * sq_b + (q_y * sq_h + q_x * sq_w), ALIGN_Q) + q_head
    q = tl.load(qkv + q_off[:, None] + e[None, :], mask=q_ok[:, None] & e_ok[None, :], other=0.0)
    q = (q.to(tl.float32) * scale).to(dt)  # round the scaled q like eager PyTorch's q * scale

    c = tl.arange(0, BLOCK_N)
    k_lg = c // KEYS                               # local group of each key column
    k_grp = group0 + k_lg
    k_grp_ok = k_grp < n_groups
    k_seq = k_grp // HEADS
    k_base = tl.multiple_of((k_seq // 4).to(tl.int64) * sq_b + (((k_seq // 2) % 2) * sq_h + (k_seq % 2) * sq_w),
                            ALIGN_Q) + (k_grp % HEADS) * HD
    k_pos = c % KEYS
    sq_h2 = 2 * sq_h
    sq_w2 = 2 * sq_w
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HD_PAD], tl.float32)
    for start in range(0, N, KEYS):
        k_tok = start + k_pos
        k_ok = k_tok < N
        k_off = k_base + tl.multiple_of((k_tok // nw) * sq_h2 + (k_tok % nw) * sq_w2, ALIGN_Q)
        kv = qkv + k_off[:, None] + e[None, :]
        kv_mask = (k_ok & k_grp_ok)[:, None] & e_ok[None, :]
        k = tl.load(kv + D, mask=kv_mask, other=0.0)
        v = tl.load(kv + 2 * D, mask=kv_mask, other=0.0)

        if dt == tl.float32:
            s = tl.dot(q, tl.trans(k), input_precision="tf32x3")
        else:
            s = tl.dot(q, tl.trans(k))
        valid = k_ok[None, :]
        if G > 1:  # block-diagonal: a query sees only the keys of its own group
            valid = valid & (q_lg[:, None] == k_lg[None, :])
        s = tl.where(valid, s, float("-inf"))

        # Online softmax in base 2: exp(s - m) = exp2(s*log2e - m*log2e), one FMA per score.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2((m_i - m_new) * LOG2E)
        p = tl.math.exp2(s * LOG2E - (m_new * LOG2E)[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if dt == tl.float32:
            acc = tl.dot(p, v, acc, input_precision="tf32x3")
        else:
            acc = tl.dot(p.to(dt), v, acc)
        m_i = m_new

    o = acc / l_i[:, None]
    o_off = tl.multiple_of(q_b * so_b + (q_y * so_h + q_x * so_w), ALIGN_O) + q_head
    tl.store(out + o_off[:, None] + e[None, :], o.to(dt), mask=q_ok[:, None] & e_ok[None, :])


@dataclass(frozen=True)
class AttentionConfig:
    """A launch configuration: ``G`` groups of ``BLOCK_M // G`` queries per program, keys in steps of
    ``BLOCK_N // G``. With ``G > 1`` one step must cover the whole sequence (``BLOCK_N // G >= N``)."""

    BLOCK_M: int
    BLOCK_N: int
    G: int
    num_warps: int
    num_stages: int


def gpu_configs(N: int, dtype: torch.dtype, head_dim: int) -> list:
    """The GPU tiles for ``N`` tokens. 16-bit dtypes: short sequences (N <= 32) pack ``64 / pow2(N)``
    groups into one 64x64 step; longer ones take one group per program, 64-key steps, and 128 (8 warps)
    or 64 (4 warps) queries, which ``launch_config`` picks by grid size. float32 (the accuracy path, not
    the fast one) shrinks the short tile to 32 and the key step to 32, or 16 for head dims above 32:
    3xTF32 dots hold every operand twice, and wider fp32 tiles spill on sm_80 / sm_90."""
    np2 = max(16, triton.next_power_of_2(N))
    if dtype == torch.float32:
        tile, keys = 32, (32 if head_dim <= 32 else 16)
    else:
        tile, keys = 64, 64
    if np2 < tile:  # one step covers every group's keys: nothing to pipeline
        return [AttentionConfig(tile, tile, tile // np2, 4, 1)]
    if np2 <= 64:   # the same specialisation as longer sequences' small tile
        return [AttentionConfig(64, keys, 1, 4, 2)]
    return [AttentionConfig(128, keys, 1, 8, 2), AttentionConfig(64, keys, 1, 4, 2)]


def launch_config(N: int, n_groups: int, dtype: torch.dtype, head_dim: int,
                  device: torch.device | None = None) -> AttentionConfig:
    """The configuration the launcher uses for ``N`` tokens and ``n_groups = B*4*heads`` (sequence, head)
    pairs: 128 queries per program once that still fills the device twice over, else 64. Under the
    interpreter, whose cost grows with the number of programs, tiles are 128 wide (wider ones are slower:
    numpy hands their dots to a multithreaded BLAS that fights the 2-core CI machine)."""
    if interpreting():
        np2 = max(16, triton.next_power_of_2(N))
        return AttentionConfig(128, 128, max(1, 128 // np2), 4, 1)
    configs = gpu_configs(N, dtype, head_dim)
    if len(configs) == 1:
        return configs[0]
    big, small = configs
    sms = sm_count(device if device is not None else "cpu")
    return big if n_groups * triton.cdiv(N, big.BLOCK_M) >= 2 * sms else small


def _align(shape, strides) -> int:
    """Largest power of two (at most 16) dividing the batch, row and column strides of a tensor (those of
    size-1 dimensions never multiply a non-zero index): the vector width its loads may assume."""
    g = 0
    for size, stride in zip(shape[:3], strides[:3]):
        if size > 1:
            g = math.gcd(g, stride)
    return math.gcd(g, 16) if g else 16


class AttentionPlan:
    """``patch_attention`` resolved for one qkv signature: ``plan(qkv)`` allocates ``out`` and launches."""

    __slots__ = ("launch", "out_shape", "dtype", "device", "poison")

    def __init__(self, launch_, out_shape, dtype, device, poison):
        self.launch, self.out_shape, self.dtype, self.device, self.poison = launch_, out_shape, dtype, device, poison

    def __call__(self, qkv: torch.Tensor, out: torch.Tensor | None = None, traced: bool = False) -> torch.Tensor:
        if out is None:
            out = empty_output(self.out_shape, self.dtype, self.device, self.poison)
        if self.launch is not None:
            (self.launch.traced if traced else self.launch)(qkv, out)
        return out


def patch_attention_plan(qkv: torch.Tensor, heads: int, *, out: torch.Tensor | None = None,
                         config: AttentionConfig | None = None) -> AttentionPlan:
    """Checks and launch configuration of ``patch_attention`` for a qkv (and out) like these: metadata
    only. qkv must already have channel stride 1."""
    if qkv.dim() != 4:
        raise ValueError(f"patch_attention: qkv must be [B, H, W, 3*d], got shape {tuple(qkv.shape)}")
    B, H, W, C3 = qkv.shape
    if qkv.dtype not in TRITON_DTYPE:
        raise TypeError(f"patch_attention: dtype {qkv.dtype} not supported (float32, float16, bfloat16)")
    if H % 2 or W % 2:
        raise ValueError(f"patch_attention: H and W must be even (2x2 patches), got {H}x{W}")
    if heads <= 0 or C3 % (3 * heads):
        raise ValueError(f"patch_attention: {C3} channels do not split into q, k, v of {heads} heads")
    d = C3 // 3
    hd = d // heads
    if hd > 128:
        raise ValueError(f"patch_attention: head dim {hd} > 128 is not supported")
    if out is not None and (out.shape != (B, H, W, d) or out.dtype != qkv.dtype or out.stride(-1) != 1):
        raise ValueError(f"patch_attention: out must be [{B}, {H}, {W}, {d}] {qkv.dtype} with channel stride 1")
    out_strides = out.stride() if out is not None else (H * W * d, W * d, d, 1)
    N = (H // 2) * (W // 2)
    n_groups = B * 4 * heads
    kernel_launch = None
    if N and B:
        cfg = config or launch_config(N, n_groups, qkv.dtype, hd, qkv.device)
        rows = cfg.BLOCK_M // cfg.G
        if cfg.G > 1 and cfg.BLOCK_N // cfg.G < N:
            raise ValueError(f"patch_attention: {cfg} packs {cfg.G} groups but cannot hold N = {N} keys")
        grid = (triton.cdiv(N, rows) * triton.cdiv(n_groups, cfg.G),)
        kernel_launch = Launch(
            _patch_attention_kernel, grid,
            (n_groups, N, W // 2, qkv.stride(0), qkv.stride(1), qkv.stride(2), *out_strides[:3], hd ** -0.5),
            HEADS=heads, HD=hd, HD_PAD=max(16, triton.next_power_of_2(hd)),
            G=cfg.G, BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N,
            ALIGN_Q=_align(qkv.shape, qkv.stride()), ALIGN_O=_align((B, H, W, d), out_strides),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return AttentionPlan(kernel_launch, (B, H, W, d), qkv.dtype, qkv.device, poisoning())


def patch_attention(qkv: torch.Tensor, heads: int, *, out: torch.Tensor | None = None,
                    config: AttentionConfig | None = None) -> torch.Tensor:
    """Multi-head attention over the 2x2-patch sequences of an NHWC map (launched traceably).

    qkv: [B, H, W, 3*d] float32/float16/bfloat16, H and W even, channel stride 1 (other strides free);
        channels [0, d) are q, [d, 2d) k, [2d, 3d) v, head h owning h*hd ... (h+1)*hd - 1, hd = d / heads.
    Returns out: [B, H, W, d], same dtype: at pixel (y, x) the head-concatenated attention output of the
    query at that pixel within its sequence (b, y % 2, x % 2), i.e. softmax((q * hd**-0.5) @ k^T) @ v.
    ``out`` may be given (any strides with channel stride 1) and is then written and returned;
    ``config`` overrides ``launch_config`` (tests use it to run the GPU tiles under the interpreter).
    """
    if qkv.dim() == 4 and qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    return patch_attention_plan(qkv, heads, out=out, config=config)(qkv, out, traced=True)


def compile_configs() -> list:
    """Every specialisation the engine launches for MobileViT v1 xxs/xs/s at inputs 256 and 512
    (N = 16 ... 1024, head dims 16 ... 60), in float32, float16 and bfloat16, contiguous NHWC."""
    from fastmvit.variants import get_variant

    shapes = set()  # (heads, head dim, N)
    for name in ("xxs", "xs", "s"):
        stages = [s for s in get_variant(name).stages if s.transformer is not None]
        for size in (256, 512):
            for k, stage in enumerate(stages):
                side = size // (8 << k) // 2
                shapes.add((stage.transformer.heads, stage.transformer.head_dim, side * side))
    configs = {}
    for heads, hd, N in sorted(shapes):
        d = heads * hd
        for dtype, tname in TRITON_DTYPE.items():
            for cfg in gpu_configs(N, dtype, hd):
                name = f"patch_attention-hd{hd}-M{cfg.BLOCK_M}-N{cfg.BLOCK_N}-G{cfg.G}-w{cfg.num_warps}-s{cfg.num_stages}-{tname}"
                signature = {"qkv": f"*{tname}", "out": f"*{tname}"}
                signature.update({a: "i32" for a in ("n_groups", "N", "nw", "sq_b", "sq_h", "sq_w",
                                                     "so_b", "so_h", "so_w")})
                signature["scale"] = "fp32"
                constexprs = dict(HEADS=heads, HD=hd, HD_PAD=max(16, triton.next_power_of_2(hd)), G=cfg.G,
                                  BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N,
                                  ALIGN_Q=math.gcd(3 * d, 16), ALIGN_O=math.gcd(d, 16))
                signature.update({k: "constexpr" for k in constexprs})
                configs[name] = CompileConfig(name, _patch_attention_kernel, signature, constexprs,
                                              cfg.num_warps, cfg.num_stages)
    return list(configs.values())
