"""Shared test set-up. On a machine without CUDA the Triton kernels run under the interpreter, which must
be chosen before any kernel module is imported."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # as the engine sets it (fastmvit.engine.prepare_kernels)

# Every output a kernel launcher allocates starts as NaN (fastmvit.kernels._common.empty_output), so an
# element a kernel fails to write fails its test, in a kernel test or deep inside a whole model.
os.environ["FASTMVIT_POISON_OUTPUTS"] = "1"

# backend="auto" on CPU tensors runs the CPU engine (an ONNX export per model and size) when a runtime is
# installed. The suite's parity tests compare the plain PyTorch path exactly with each reference, so "auto"
# runs it here; tests/test_cpu_engine.py tests the CPU engine, and "auto" choosing it, on its own.
os.environ.setdefault("FASTMVIT_CPU_ENGINE", "torch")

# Tests must never reach the network (pretrained downloads are tested up to huggingface_hub's API).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _no_network_cache(tmp_path_factory, monkeypatch):
    """Point the fastmvit and Hugging Face caches at empty folders so no test finds a user's files."""
    import huggingface_hub.constants as hfc

    root = tmp_path_factory.mktemp("caches")
    monkeypatch.setenv("FASTMVIT_CACHE", str(root / "fastmvit"))
    monkeypatch.setattr(hfc, "HF_HUB_CACHE", str(root / "hf"))
