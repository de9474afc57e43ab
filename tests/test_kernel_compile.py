"""Every kernel specialisation the engine launches compiles for sm_90 with no register spill:
``python -m fastmvit.kernels check --arch 90`` (the Triton compiler and ptxas run without a GPU)."""
import json
import os
import subprocess
import sys

import pytest
import triton

from fastmvit.kernels.check import FAMILIES

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


@pytest.mark.skipif(not os.path.exists(CUOBJDUMP), reason="this Triton has no bundled cuobjdump")
def test_every_kernel_compiles_for_sm90_without_spills(tmp_path):
    out = tmp_path / "check.json"
    env = {**os.environ, "TRITON_INTERPRET": "0"}  # the real compiler, not the interpreter
    run = subprocess.run([sys.executable, "-m", "fastmvit.kernels", "check", "--arch", "90", "--json", str(out)],
                         env=env, capture_output=True, text=True, timeout=1800)
    results = json.loads(out.read_text())
    failed = [f"{r['family']}/{r['name']}: {r['error']}" for r in results if not r["ok"]]
    assert run.returncode == 0 and not failed, "\n".join(failed) or run.stderr[-3000:]
    assert {r["family"] for r in results} >= set(FAMILIES)  # no family silently missing
    # DeepLabV3 on the engine: the ASPP's pointwise convs and the label-map kernel (families of their own),
    # the atrous branches (dense 3x3 + ReLU, one specialisation for every dilation), the pooling branch
    assert {"aspp", "labels"} <= set(FAMILIES)
    for prefix in ("conv3x3-aspp-", "pool_linear_relu-", "pointwise-project-", "bilinear_argmax-"):
        assert any(r["name"].startswith(prefix) for r in results), prefix
    names = {r["name"] for r in results}  # the batch-1 split kernels (split rule) and their merges
    assert {"sepattn_context-fp16-packed-split", "sepattn_context_merge"} <= names
    assert any("-splitk-" in n and n.startswith("conv3x3-fusion") for n in names)
    assert any(n.startswith("conv3x3-splitk-merge") for n in names)
    assert all(r["stack"] == 0 for r in results)
