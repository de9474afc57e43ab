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

# Tests must never reach the network (pretrained downloads are tested up to huggingface_hub's API).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

torch.manual_seed(0)

# timm imports torchvision, which has no build that loads with the CPU torch: make its pure-Python parts
# importable (tests/torchvision_standin.py; a no-op where a real torchvision loads).
from .torchvision_standin import install as _install_torchvision  # noqa: E402

TORCHVISION = _install_torchvision()


def pytest_report_header(config):
    return f"timm tests: {TORCHVISION}"


@pytest.fixture(autouse=True)
def _no_network_cache(tmp_path_factory, monkeypatch):
    """Point the fastmvit and Hugging Face caches at empty folders so no test finds a user's files."""
    import huggingface_hub.constants as hfc

    root = tmp_path_factory.mktemp("caches")
    monkeypatch.setenv("FASTMVIT_CACHE", str(root / "fastmvit"))
    monkeypatch.setattr(hfc, "HF_HUB_CACHE", str(root / "hf"))
