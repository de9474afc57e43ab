"""fastmvit's own module tree exported to ONNX, once per (weights, numerics, input height and width), and
kept on disk so that the next process starts without exporting again.

The exported graph is the reference forward itself (BatchNorm unfolded: ONNX Runtime and OpenVINO fold it
when they load the graph), with a dynamic batch axis, and two rewrites of the same math (``graph_form``):
the packed q|k|v projections of v1 and v2 as three layers each, because OpenVINO's static-shape builds
compute v1's packed form wrongly and run v2's channel split as a scalar reference kernel (profiled, v2-1.0
batch 8 float32: 13% of the time). Height and width are fixed per export because the forward's odd-size
handling (v1's resize around the transformer, v2's two odd-size conventions) is Python control flow on the
shapes, which a trace records for one size only.

Profiled on ONNX Runtime (S and v2-1.0, 256x256, batch 1 and 8): Conv 35-60% of the time, MatMul 20-25% (S),
SiLU 14-25% (fused by ONNX Runtime into QuickGelu, not into the convolutions), Transpose 3-4%; BatchNorm is
already folded. Rewrites tried and not kept, no gain measured (interleaved, process CPU time, load 4-11):
v2's transformer on the image layout without unfold/fold transposes (+-5%, either sign); v1 attention as
ONNX Runtime's com.microsoft Attention op (-10% at batch 8, +10% at batch 1, then +6% at batch 8). Measured
worse: turning off ONNX Runtime's QuickGelu fusion (+12%) or its NCHWc layout (level EXTENDED: +35%).
"""
from __future__ import annotations

import copy
import hashlib
import os
import threading
import warnings
from pathlib import Path
from typing import Tuple

import torch
from torch import nn

from ..model.blocks import Attention, SeparableAttention

# Bump when the exported graph changes for the same weights (a different wrapper, opset or exporter).
EXPORT_VERSION = 3
OPSET = 17
# Each artefact holds the weights (10-80 MB): keep the most recently used few.
MAX_FILES_ON_DISK = 32

_export_lock = threading.Lock()  # the TorchScript tracer is not thread-safe


def cache_dir() -> Path:
    """``$FASTMVIT_CACHE/cpu`` (default ``~/.cache/fastmvit/cpu``)."""
    from ..weights.hub import cache_dir as fastmvit_cache

    return fastmvit_cache() / "cpu"


def weights_fingerprint(model: nn.Module) -> str:
    """A hash of every parameter and buffer (names, dtypes, shapes, bytes): what the exported graph embeds."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class _ReferenceForward(nn.Module):
    """The model's plain-PyTorch forward, whatever its ``backend`` (tracing ``model`` itself would dispatch)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        # torch.onnx.export puts the module back in the mode it found it in, recursively: a wrapper left in
        # training mode (nn.Module's default) would switch the model's BatchNorms to training mode.
        self.training = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(x))


def _split_rows(make, weight: torch.Tensor, bias: torch.Tensor, rows) -> list:
    """Layers ``make(in, out)`` holding consecutive row blocks (``rows``: their sizes) of a packed weight."""
    layers, start = [], 0
    for n in rows:
        layer = make(weight.shape[1], n)
        with torch.no_grad():
            layer.weight.copy_(weight[start:start + n])
            layer.bias.copy_(bias[start:start + n])
        layers.append(layer)
        start += n
    return layers


class _SplitQkvAttention(nn.Module):
    """v1 attention with its packed q|k|v linear exported as three linears: the same sums per output, and
    no reshape-permute-unbind of the packed result, the pattern with which OpenVINO 2026.4's snippets
    (its JIT-fused subgraphs, used by static-shape builds) compute short sequences wrongly: up to 7% of the
    largest logit, xs at 64x64 (bench/openvino_snippets_check.py). With three linears they are exact (at
    most 3.5e-6 at every size checked) and faster than with snippets off (2-core AMX Xeon, static build,
    ms packed without snippets / split with them: xxs b8 82 / 71, S b8 263 / 236)."""

    def __init__(self, attn: Attention):
        super().__init__()
        self.attn = attn
        dim = attn.heads * attn.head_dim
        self.q, self.k, self.v = _split_rows(nn.Linear, attn.qkv.weight.detach(), attn.qkv.bias.detach(),
                                             (dim, dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape

        def heads(t):
            return t.reshape(B, N, self.attn.heads, self.attn.head_dim).transpose(1, 2)

        return self.attn.attend(heads(self.q(x)), heads(self.k(x)), heads(self.v(x)))


class _SplitProjectionAttention(nn.Module):
    """MobileViTv2's separable attention with its packed q|k|v 1x1 conv exported as three convs: the same
    sums per output channel, and no channel split in the graph, which OpenVINO 2026.4 runs as a reference
    (scalar) kernel. Measured, v2-1.0 256x256 on OpenVINO static builds (2-core AMX Xeon, load 0.6, ms
    packed / split): float32 b1 29.4 / 25.3, b8 217 / 180; bf16 b1 16.5 / 12.7, b8 99 / 73."""

    def __init__(self, attn: SeparableAttention):
        super().__init__()
        self.attn = attn
        d = attn.dim
        self.q, self.k, self.v = _split_rows(lambda i, o: nn.Conv2d(i, o, 1), attn.qkv_proj.weight.detach(),
                                             attn.qkv_proj.bias.detach(), (1, d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn.attend(self.q(x), self.k(x), self.v(x))


_EXPORT_FORMS = {Attention: _SplitQkvAttention, SeparableAttention: _SplitProjectionAttention}


def graph_form(model: nn.Module) -> nn.Module:
    """What is exported: a float32 copy of ``model`` (never the caller's) with the rewrites above, the same
    math in forms the runtimes run faster (and, for v1, correctly on OpenVINO's static builds)."""
    source = copy.deepcopy(model).float()
    for parent in list(source.modules()):
        for name, child in list(parent.named_children()):
            if type(child) in _EXPORT_FORMS:
                setattr(parent, name, _EXPORT_FORMS[type(child)](child))
    return source


def artefact_name(model, fingerprint: str, size: Tuple[int, int]) -> str:
    key = "|".join(map(str, (EXPORT_VERSION, OPSET, torch.__version__, model.variant.name, model.num_classes,
                             model.numerics, size, fingerprint)))
    return f"{model.variant.name}-{size[0]}x{size[1]}-{hashlib.sha256(key.encode()).hexdigest()[:20]}.onnx"


def exported_onnx(model, fingerprint: str, size: Tuple[int, int]) -> str:
    """Path of the ONNX graph of ``model`` for [B, 3, *size] float32 inputs: from the disk cache, or exported
    now (from ``graph_form(model)``) and written there atomically."""
    directory = cache_dir()
    path = directory / artefact_name(model, fingerprint, size)
    if path.is_file():
        os.utime(path)  # most recently used: the last to be pruned
        return str(path)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
    with _export_lock, torch.no_grad(), warnings.catch_warnings():
        # The tracer warns at every Python decision on a shape (input checks, odd-size branches): each is
        # meant to be fixed per export, which is why height and width are part of the artefact's key.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        # The TorchScript exporter is deprecated (see below for why it is used); its notes say so at each call.
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        source = graph_form(model)
        example = torch.zeros(2, 3, *size, device="cpu")
        # The TorchScript exporter: it exports a MobileViT in seconds where the torch.export-based one takes
        # ten times longer on a small CPU, and its dynamic batch axis covers every batch size.
        torch.onnx.export(_ReferenceForward(source), (example,), str(tmp), dynamo=False,
                          input_names=["images"], output_names=["logits"], opset_version=OPSET,
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
    os.replace(tmp, path)
    _prune(directory)
    return str(path)


def _prune(directory: Path) -> None:
    files = sorted(directory.glob("*.onnx"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in files[MAX_FILES_ON_DISK:]:
        for path in [old, *directory.glob(f"{old.stem}.*.pick.json")]:  # with its runtime choices (pick)
            try:
                path.unlink()
            except OSError:
                pass  # another process pruned it first
