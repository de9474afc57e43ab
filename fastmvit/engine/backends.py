"""Which implementation runs each op of the fused forward, for ``python -m fastmvit info``."""
from __future__ import annotations

from typing import Dict

from .graphs import DEFAULT_MEMORY_FRACTION


def extension_status() -> str:
    from ..ops import cuda_ext

    return cuda_ext.extension_status()


def cpu_engine_status() -> str:
    """What backend="auto" runs on float32 CPU tensors (the per-dtype detail: ``info``'s CPU engine)."""
    import torch

    from ..cpu import auto_runtimes

    runtimes = auto_runtimes(torch.float32)
    runs = (f"the CPU engine on {' or '.join(runtimes)}, the faster measured per model" if runtimes else
            "the plain PyTorch modules")
    return f"float32: {runs} (see 'CPU engine' above; backend='triton' forces the kernels, interpreted)"


def op_backends() -> Dict[str, str]:
    """op -> what runs it on a CUDA tensor (backend="auto"); CPU tensors run the plain PyTorch modules."""
    from ..ops import cuda_ext

    cuda_dw = ("built; selected with FASTMVIT_DWCONV=cuda (the default stays Triton until a GPU measurement "
               "shows the CUDA kernel faster)" if cuda_ext.available() else "not built")
    return {
        "stem, v1 local and fusion 3x3 convs": "triton fastmvit::conv3x3 (implicit GEMM; fusion reads [x, y] "
                                               "without a concatenation)",
        "inverted residual (MV2)": "triton fastmvit::inverted_residual (one kernel) where "
                                   "ops.mv2_block.should_fuse says so, else linear + dwconv3x3 + linear",
        "depthwise 3x3 + BN + SiLU": f"triton fastmvit::dwconv3x3 (CUDA C++ fastmvit::dwconv3x3_cuda: {cuda_dw})",
        "1x1 convs, linears (+BN, LN/GN, SiLU, residual)": "triton fastmvit::linear (fused prologues/epilogues)",
        "v1 unfold + attention + fold": "triton fastmvit::patch_attention",
        "v2 separable attention": "triton fastmvit::sepattn_context + fastmvit::linear (relu-scale prologue)",
        "global pool + classifier": "pooling in the epilogue of the last 1x1 conv (fastmvit::linear_pool), "
                                    "then fastmvit::pool_linear on the pooled features",
        "DeepLabV3 atrous 3x3 (conv-BN-ReLU)": "triton fastmvit::conv3x3 (dilation a run-time argument)",
        "DeepLabV3 ASPP projection, 1x1 branch, classifier": "triton fastmvit::pointwise (reads the four map "
                                                             "branches without a concatenation; the image-pooling "
                                                             "branch is fastmvit::pool_linear + ReLU, then a per-image "
                                                             "bias)",
        "segmentation label maps (DeepLabV3.labels)": "triton fastmvit::bilinear_argmax (bilinear upsampling + "
                                                      "argmax in one kernel)",
        "odd-size resize (rare)": "torch F.interpolate",
        "CUDA graphs": f"every batch size while the graphs' memory pool fits in {DEFAULT_MEMORY_FRACTION:.0%} of the "
                       "device's memory (load(..., cuda_graphs=False) turns them off)",
        "CPU tensors": cpu_engine_status(),
    }
