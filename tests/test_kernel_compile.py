"""Every kernel specialisation the engine launches compiles for sm_90 with no register spill:
``python -m fastmvit.kernels check --arch 90`` (the Triton compiler and ptxas run without a GPU)."""
import json
import os
import subprocess
import sys

import pytest
import triton

from fastmvit.kernels import dwconv
from fastmvit.kernels.check import FAMILIES

from .kernels.common import compiled_resources

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


@pytest.mark.skipif(not os.path.exists(CUOBJDUMP), reason="this Triton has no bundled cuobjdump")
def test_depthwise_registers_within_caps_sm90():
    """The Triton depthwise conv is memory-bound: its registers (occupancy) are capped per dtype
    (``dwconv.REGISTER_CAPS``; unrolled taps took 138 for fp16). Each dtype's widest-channel tile at
    stride 2, compiled for sm_90: within the cap, no spill, 16-byte loads and stores (all of them:
    ``python -m fastmvit.kernels check --family dwconv``)."""
    cfgs = {c.name: c for c in dwconv.compile_configs()}
    pick = [next(n for n in cfgs if n.endswith(dt) and "-BC64-" in n and "-s2-" in n) for dt in ("fp16", "bf16", "fp32")]
    for use in compiled_resources(dwconv.__name__, pick):
        cap = dwconv.max_registers(cfgs[use["name"]], 90)
        assert cap is not None and use["registers"] <= cap, use
        assert use["stack"] == 0, use
        assert use["ld_v4"] > 0 and use["st_v4"] > 0, f"{use['name']}: no 16-byte global loads or stores"


def test_check_selects_by_family_dtype_and_name():
    """``check --family dwconv --dtype bf16 --only -s2-`` compiles exactly those (the listing only here)."""
    from fastmvit.kernels import check

    tasks = check.select((90,), only=["-s2-"], families=["dwconv"], dtypes=["bf16"])
    names = [check._configs(f, a)[i].name for f, i, a in tasks]
    assert names and all(n.startswith("dwconv3x3-") and "-s2-" in n and n.endswith("-bf16") for n in names)
    assert len(check.select((90, 80), families=["dwconv"])) == 2 * len(dwconv.compile_configs())
    with pytest.raises(SystemExit, match="unknown kernel families"):
        check.select((90,), families=["dwconvs"])


@pytest.mark.skipif(not os.path.exists(CUOBJDUMP), reason="this Triton has no bundled cuobjdump")
def test_check_fails_a_kernel_over_its_register_cap():
    """A module's max_registers is enforced by the check itself (here a cap of 16 for fp16)."""
    script = """
import dataclasses, json
from fastmvit.kernels import check, dwconv
dwconv.REGISTER_CAPS[90]["fp16"] = 16
i = next(i for i, c in enumerate(check._configs("dwconv", 90)) if c.name.endswith("-fp16"))
print(json.dumps(dataclasses.asdict(check._compile_one("dwconv", i, 90))))
"""
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert not result["ok"] and result["error"] == f"{result['registers']} registers > cap 16", result
