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

# Every replayed launch plan is checked against its recording (same ops, same tensor layouts).
from fastmvit.engine.engine import Engine  # noqa: E402  (no kernels imported: they load with the first engine)

Engine.check_replays = True


@pytest.fixture(autouse=True)
def _no_network_cache(tmp_path_factory, monkeypatch):
    """Point the fastmvit and Hugging Face caches at empty folders so no test finds a user's files."""
    import huggingface_hub.constants as hfc

    root = tmp_path_factory.mktemp("caches")
    monkeypatch.setenv("FASTMVIT_CACHE", str(root / "fastmvit"))
    monkeypatch.setattr(hfc, "HF_HUB_CACHE", str(root / "hf"))
