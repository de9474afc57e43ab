"""The fused forward: a MobileViT turned, once per (device, dtype), into a list of steps over packed weights.

Every BatchNorm is folded into the convolution before it, every LayerNorm/GroupNorm affine into the GEMM
after it, and activations stay NHWC from the stem (which reads the NCHW input directly) to the pooled
classifier. Each step calls the ops of ``fastmvit.ops`` (Triton kernels, or the CUDA extension) through the
``run`` it is given: the registered ops themselves, or the launch plans that ``fastmvit.engine.replay``
resolves once per input signature. The module tree stays the source of truth: nothing here reads a
checkpoint.
"""
from __future__ import annotations

import functools
import math
import os
from typing import Callable, List

import torch
import torch.nn.functional as F

from ..model.blocks import InvertedResidual, MobileViTBlock, MobileViTv2Block
from ..model.layers import ConvNormAct
from ..ops import aspp, attention, conv, cuda_ext, dwconv, gemm, mv2_block, pool, sepattn
from .fold import fold_bn

# How a step calls an op: ``run(op, *args, **kwargs)``. The engine passes either ``direct`` (the registered
# ops: what torch.compile traces) or a launch plan's recorder / replay (``fastmvit.engine.replay``).
Run = Callable[..., object]
Step = Callable[[torch.Tensor, Run], torch.Tensor]


def _folded(m: ConvNormAct):
    return fold_bn(m.conv.weight, m.bn)


def depthwise_impl() -> str:
    """The depthwise 3x3 the engine launches: "triton" (fastmvit::dwconv3x3), or "cuda" (the CUDA C++
    kernel of csrc/, fastmvit::dwconv3x3_cuda) when FASTMVIT_DWCONV=cuda and the extension is built. Triton
    stays the default until a GPU measurement shows the CUDA kernel faster (none could be made yet)."""
    choice = os.environ.get("FASTMVIT_DWCONV", "triton")
    if choice not in ("triton", "cuda"):
        raise ValueError(f"FASTMVIT_DWCONV must be 'triton' or 'cuda', got {choice!r}")
    if choice == "cuda" and not cuda_ext.available():
        raise RuntimeError(f"FASTMVIT_DWCONV=cuda, but the CUDA extension is {cuda_ext.extension_status()}")
    return choice


def _depthwise_op(dilation: int):
    """The depthwise op for this dilation: the CUDA kernel only where chosen and undilated."""
    return cuda_ext.dwconv3x3_cuda if depthwise_impl() == "cuda" and dilation == 1 else dwconv.dwconv3x3


def _pack_linear(weight, bias=None, norm=None, *, dtype, device) -> gemm.PackedLinear:
    """A 1x1 conv / linear for ``gemm.linear``, with the affine of the LayerNorm/GroupNorm before it folded in."""
    return gemm.pack_linear(weight, bias, norm_weight=None if norm is None else norm.weight,
                            norm_bias=None if norm is None else norm.bias, dtype=dtype, device=device)


def _interpolate_nhwc(x: torch.Tensor, size, align_corners: bool) -> torch.Tensor:
    """Bilinear resize of an NHWC map (the rare odd-size path); stays NHWC without a layout copy."""
    y = F.interpolate(x.permute(0, 3, 1, 2), size=size, mode="bilinear", align_corners=align_corners)
    return y.permute(0, 2, 3, 1).contiguous()


class Stem:
    def __init__(self, m: ConvNormAct, dtype):
        self.w, self.b = conv.pack_conv3x3(*_folded(m), dtype)

    def __call__(self, x, run: Run):  # x: the model's NCHW input
        return run(conv.conv3x3, x, self.w, self.b, stride=2, act=True, input_nchw=True)


class InvertedResidualStep:
    """Fused into one kernel where ``mv2_block.should_fuse`` says so for the live shape, else three
    kernels: expand GEMM (+SiLU), depthwise (+SiLU), project GEMM (+residual). A dilated block (the first
    of a segmentation backbone's dilated stage) always runs unfused: the fused kernel has no dilation."""

    def __init__(self, m: InvertedResidual, dtype, device):
        (w1, b1), (wd, bd), (w3, b3) = (_folded(c) for c in (m.conv1_1x1, m.conv2_kxk, m.conv3_1x1))
        self.stride = m.conv2_kxk.conv.stride[0]
        self.dilation = m.conv2_kxk.conv.dilation[0]
        self.fused = None if self.dilation != 1 else mv2_block.pack_inverted_residual(
            w1, b1, wd, bd, w3, b3, stride=self.stride, dtype=dtype, residual=m.has_residual)
        self.expand = gemm.pack_linear(w1, b1, dtype=dtype, device=device)
        self.dw_w, self.dw_b = dwconv.pack_dwconv3x3(wd, bd)
        self.depthwise = _depthwise_op(self.dilation)
        self.project = gemm.pack_linear(w3, b3, dtype=dtype, device=device)
        self.residual = m.has_residual

    def __call__(self, x, run: Run):
        # a rule: a replay returns the recorded answer; a dilated block has no fused form
        if self.fused is not None and run(mv2_block.fuse_choice, x, self.fused):
            return run(mv2_block.inverted_residual, x, self.fused, fused=True)
        B, H, W, C = x.shape
        rows = x.reshape(-1, C)
        h = run(gemm.linear, rows, self.expand, act="silu").reshape(B, H, W, -1)
        h = run(self.depthwise, h, self.dw_w, self.dw_b, stride=self.stride, dilation=self.dilation, act=True)
        _, OH, OW, hidden = h.shape
        y = run(gemm.linear, h.reshape(-1, hidden), self.project, residual=rows if self.residual else None)
        return y.reshape(B, OH, OW, -1)


class MobileViTStep:
    """v1 block. The transformer runs on the NHWC map itself: LayerNorm, the projections and the MLP are
    per pixel, and the attention kernel reads each 2x2-patch sequence as a strided pixel set."""

    def __init__(self, m: MobileViTBlock, dtype, device):
        pack = functools.partial(_pack_linear, dtype=dtype, device=device)
        self.local_w, self.local_b = conv.pack_conv3x3(*_folded(m.conv_kxk), dtype)
        self.to_tokens = pack(m.conv_1x1.weight)
        self.heads = m.transformer[0].attn.heads
        self.layers = [(pack(t.attn.qkv.weight, t.attn.qkv.bias, t.norm1), pack(t.attn.proj.weight, t.attn.proj.bias),
                        pack(t.mlp.fc1.weight, t.mlp.fc1.bias, t.norm2), pack(t.mlp.fc2.weight, t.mlp.fc2.bias))
                       for t in m.transformer]
        wp, bp = _folded(m.conv_proj)
        self.proj_with_norm = pack(wp, bp, m.norm)      # final LayerNorm fused into the projection
        self.proj = pack(wp, bp)                       # for odd maps, where the LayerNorm runs before a resize
        self.norm = m.norm
        self.fusion_w, self.fusion_b = conv.pack_conv3x3(*_folded(m.conv_fusion), dtype)

    def __call__(self, x, run: Run):
        B, H, W, C = x.shape
        y = run(conv.conv3x3, x, self.local_w, self.local_b, stride=1, act=True)
        t = run(gemm.linear, y.reshape(-1, C), self.to_tokens).reshape(B, H, W, -1)
        Hp, Wp = H + H % 2, W + W % 2  # the map rounded up to whole 2x2 patches
        resized = (Hp, Wp) != (H, W)
        if resized:
            t = _interpolate_nhwc(t, (Hp, Wp), align_corners=False)
        d = t.shape[-1]
        t = t.reshape(-1, d)
        for qkv_w, proj_w, fc1_w, fc2_w in self.layers:
            qkv = run(gemm.linear, t, qkv_w, norm="layer").reshape(B, Hp, Wp, 3 * d)
            a = run(attention.patch_attention, qkv, self.heads).reshape(-1, d)
            t = run(gemm.linear, a, proj_w, residual=t)
            h = run(gemm.linear, t, fc1_w, norm="layer", act="silu")
            t = run(gemm.linear, h, fc2_w, residual=t)
        if resized:
            t = F.layer_norm(t, (d,), self.norm.weight.to(t.dtype), self.norm.bias.to(t.dtype), self.norm.eps)
            t = _interpolate_nhwc(t.reshape(B, Hp, Wp, d), (H, W), align_corners=False).reshape(-1, d)
            p = run(gemm.linear, t, self.proj, act="silu")
        else:
            p = run(gemm.linear, t, self.proj_with_norm, norm="layer", act="silu")
        return run(conv.conv3x3, x, self.fusion_w, self.fusion_b, stride=1, act=True, x2=p.reshape(B, H, W, C))


class MobileViTv2Step:
    """v2 block: every GroupNorm(1) is fused into the GEMM after it, its statistics emitted as partial
    sums by the GEMM before it (a split reduction, never a pass of its own)."""

    def __init__(self, m: MobileViTv2Block, dtype, device, hf_odd: bool, pool_output: bool = False):
        pack = functools.partial(_pack_linear, dtype=dtype, device=device)
        self.dw_w, self.dw_b = dwconv.pack_dwconv3x3(*_folded(m.conv_kxk))
        self.dilation = m.conv_kxk.conv.dilation[0]  # > 1 in segmentation backbones (ml-cvnets numerics)
        self.depthwise = _depthwise_op(self.dilation)
        self.to_tokens = pack(m.conv_1x1.weight)
        self.d = m.conv_1x1.weight.shape[0]
        self.qkv_columns = sepattn.qkv_columns(self.d)  # where pack_qkv put q and k
        self.layers = [(sepattn.pack_qkv(t.attn.qkv_proj.weight, t.attn.qkv_proj.bias, norm_weight=t.norm1.weight,
                                         norm_bias=t.norm1.bias, dtype=dtype, device=device),
                        pack(t.attn.out_proj.weight, t.attn.out_proj.bias),
                        pack(t.mlp.fc1.weight, t.mlp.fc1.bias, t.norm2), pack(t.mlp.fc2.weight, t.mlp.fc2.bias))
                       for t in m.transformer]
        wp, bp = _folded(m.conv_proj)
        self.proj_with_norm = pack(wp, bp, m.norm)
        self.proj = pack(wp, bp)
        self.norm = m.norm
        self.hf_odd = hf_odd
        # The last block hands the head pooled features: its map never reaches memory.
        self.pool_output = pool_output

    def __call__(self, x, run: Run):
        B, H, W, C = x.shape
        odd = H % 2 or W % 2
        if odd and not self.hf_odd:  # ml-cvnets/timm: enlarge the block input and keep the enlarged size
            x = _interpolate_nhwc(x, (math.ceil(H / 2) * 2, math.ceil(W / 2) * 2), align_corners=True)
            B, H, W, C = x.shape
            odd = False
        y = run(self.depthwise, x, self.dw_w, self.dw_b, stride=1, dilation=self.dilation, act=True)
        if odd:  # Hugging Face: the transformer sees the even part; fold leaves zeros in the rest
            y = y[:, : H // 2 * 2, : W // 2 * 2].contiguous()
        Ht, Wt = y.shape[1:3]
        d, hw = self.d, Ht * Wt
        t, stats = run(gemm.linear, y.reshape(-1, C), self.to_tokens, emit_group_stats=True, rows_per_sample=hw)
        for qkv_w, out_w, fc1_w, fc2_w in self.layers:
            qkv = run(gemm.linear, t, qkv_w, norm="group", group_stats=stats, rows_per_sample=hw)
            cv = run(sepattn.sepattn_context, qkv, d, Ht, Wt, **self.qkv_columns)
            t, stats = run(gemm.linear, qkv[:, d:2 * d], out_w, relu_scale=cv, hw=(Ht, Wt), residual=t,
                                   emit_group_stats=True, rows_per_sample=hw)
            h = run(gemm.linear, t, fc1_w, norm="group", group_stats=stats, rows_per_sample=hw, act="silu")
            t, stats = run(gemm.linear, h, fc2_w, residual=t, emit_group_stats=True, rows_per_sample=hw)
        if not odd:
            out = run(gemm.linear, t, self.proj_with_norm, norm="group", group_stats=stats, rows_per_sample=hw,
                              pool=self.pool_output)
        else:
            t = F.group_norm(t.reshape(B, Ht, Wt, d).permute(0, 3, 1, 2), 1, self.norm.weight.to(t.dtype),
                             self.norm.bias.to(t.dtype), self.norm.eps)
            t = F.pad(t, (0, W - Wt, 0, H - Ht)).permute(0, 2, 3, 1).contiguous()
            out = run(gemm.linear, t.reshape(-1, d), self.proj, rows_per_sample=H * W, pool=self.pool_output)
        return out if self.pool_output else out.reshape(B, H, W, C)  # pooled: [B, C] float32


class Head:
    """v1: the 1x1 expansion conv (+SiLU) with mean pooling in its epilogue, so the widest map never reaches
    memory, then the classifier. v2: the last block already pooled (in its projection's epilogue): the
    classifier alone."""

    def __init__(self, model, dtype, device):
        self.final = None
        if isinstance(model.final_conv, ConvNormAct):
            self.final = gemm.pack_linear(*_folded(model.final_conv), dtype=dtype, device=device)
        fc = model.head.fc
        self.fc = gemm.pack_linear(fc.weight, fc.bias, dtype=dtype, device=device) \
            if isinstance(fc, torch.nn.Linear) else None

    def __call__(self, x, run: Run):
        if self.final is not None:
            B, H, W, C = x.shape
            x = run(gemm.linear, x.reshape(-1, C), self.final, act="silu", pool=True, rows_per_sample=H * W)
        return run(pool.classifier, x, self.fc) if self.fc is not None else x  # x: [B, C] float32 pooled


class DeepLabHeadStep:
    """DeepLabV3's ASPP and classifier on the stage-5 map: the 1x1 branch and the three atrous 3x3 branches
    (conv-BN-ReLU each), the image-pooling branch reduced to a per-image bias (mean pooling with its 1x1
    conv-BN-ReLU, then its [C, C] slice of the projection: two launches on [B, C]), the projection reading
    the four maps side by side (no concatenation), then the classifier. Logits come out NCHW (a view of
    the NHWC result: channels-last strides)."""

    def __init__(self, head, dtype, device):
        pack = functools.partial(gemm.pack_linear, dtype=dtype, device=device)
        a = head.aspp
        self.branch = pack(*_folded(a.convs[0]))
        self.atrous = [(*conv.pack_conv3x3(*_folded(c), dtype), c.conv.dilation[0]) for c in a.convs[1:]]
        self.pool = pack(*_folded(a.pool))
        wp, bp = _folded(a.project)
        c = wp.shape[0]  # the projection's input: 5 branches of c channels, the pooled one last
        self.project = pack(wp[:, :4 * c])
        self.project_pooled = pack(wp[:, 4 * c:], bp)
        self.classifier = pack(head.classifier.weight, head.classifier.bias)

    def __call__(self, x, run: Run):
        maps = [run(aspp.pointwise, x, packed=self.branch, relu=True)]
        maps += [run(conv.conv3x3, x, w, b, stride=1, act="relu", dilation=d) for w, b, d in self.atrous]
        pooled = run(pool.pool_linear, x, self.pool, relu=True)                 # [B, c] float32
        image_bias = run(pool.classifier, pooled, self.project_pooled)          # [B, c] float32
        y = run(aspp.pointwise, *maps, packed=self.project, image_bias=image_bias, relu=True)
        return run(aspp.pointwise, y, packed=self.classifier, relu=False).permute(0, 3, 1, 2)


def _backbone_steps(model, device, dtype, pool_last: bool) -> List[Step]:
    hf_odd = model.numerics.v2_odd_size == "hf"
    last = list(model.stages[-1])[-1] if pool_last else None
    steps: List[Step] = [Stem(model.stem, dtype)]
    for stage in model.stages:
        for block in stage:
            if isinstance(block, InvertedResidual):
                steps.append(InvertedResidualStep(block, dtype, device))
            elif isinstance(block, MobileViTBlock):
                steps.append(MobileViTStep(block, dtype, device))
            elif isinstance(block, MobileViTv2Block):
                steps.append(MobileViTv2Step(block, dtype, device, hf_odd, pool_output=block is last))
            else:
                raise TypeError(f"no fused step for {type(block).__name__}")
    return steps


def build_steps(model, device: torch.device, dtype: torch.dtype) -> List[Step]:
    """The model's forward as steps, with weights packed for ``device`` and ``dtype``: a classifier
    (``MobileViT``) or a DeepLabV3 (``task == "segmentation"``: its dilated backbone, then the head)."""
    if getattr(model, "task", None) == "segmentation":
        return _backbone_steps(model.backbone, device, dtype, pool_last=False) + [
            DeepLabHeadStep(model.head, dtype, device)]
    return _backbone_steps(model, device, dtype, pool_last=True) + [Head(model, dtype, device)]
