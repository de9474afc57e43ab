"""Kernel specialisations compiled ahead of time for sm_90 (the Triton compiler and ptxas run without a GPU):
no register spill, and Hopper's warpgroup MMA (wgmma) in the 16-bit specialisations of every kernel that
calls tl.dot.

What CI compiles is a covering sample, not every specialisation (``python -m fastmvit.kernels check
--arch 90`` compiles them all: run it after any kernel change). Per kernel and dtype, every value that
each compile parameter takes among the specialisations the engine launches (each kernel module's
``compile_configs()``) is compiled at least once: num_warps/num_stages, every constexpr (tile sizes,
flags, vector widths, head dims, strides) and the 16-divisibility of every integer argument. Where
several specialisations bring the same new values, the heaviest is compiled (most warps, largest
constexprs), since spills show there first. A new specialisation that brings a new value (a tile, a
flag, a dtype, a kernel) is thus compiled here without listing it; what is left to ``check`` are new
combinations of values already covered (say, a flag on a tile it is not compiled with here).
"""
import inspect
import json
import math
import os
import subprocess
import sys

import pytest
import triton

from fastmvit.kernels import dwconv
from fastmvit.kernels.check import FAMILIES

from .kernels.common import compiled_resources

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
SIXTEEN_BIT = {"*fp16", "*bf16"}

# The batch-1 split kernels (the split rule) and their merges are launched, so they must be specialised
# (and, being kernels of their own or new constexpr values, they are then in the sample).
MUST_LIST = {
    # DeepLabV3 on the engine: the atrous ASPP branches (dense 3x3 + ReLU, one specialisation for every
    # dilation), the image-pooling branch, the projection over the branches, the fused label map
    "aspp": {"ASPP projection": lambda n: any(x.startswith("pointwise-project-") for x in n)},
    "labels": {"bilinear argmax": lambda n: any(x.startswith("bilinear_argmax-") for x in n)},
    "pool": {"pooling branch with ReLU": lambda n: any(x.startswith("pool_linear_relu-") for x in n)},
    "sepattn": {"token split and merge": lambda n: {"sepattn_context-fp16-packed-split", "sepattn_context_merge"} <= n},
    "conv": {"split-K fusion conv": lambda n: any("-splitk-" in x and x.startswith("conv3x3-fusion") for x in n),
             "split-K merge": lambda n: any(x.startswith("conv3x3-splitk-merge") for x in n),
             "atrous ASPP branch": lambda n: any(x.startswith("conv3x3-aspp-") for x in n)},
}

# Kernels whose 16-bit tl.dot cannot be a warpgroup MMA, and why (wgmma needs 64-row tiles per warpgroup).
NO_WGMMA = {"pool_linear_kernel": "BB = 16 samples a program: tl.dot's minimum M, an mma.sync tile"}


def features(cfg) -> set:
    """What one specialisation shows of its kernel and dtype: its launch shape, each constexpr's value and
    whether each integer argument is compiled as 16-divisible."""
    kernel = (cfg.fn.__name__, tuple(t for t in cfg.signature.values() if t.startswith("*")))
    found = {kernel + ("warps/stages", cfg.num_warps, cfg.num_stages)}
    found |= {kernel + ("constexpr", name, value) for name, value in cfg.constexprs.items()}
    found |= {kernel + ("div16" if arg in cfg.aligned else "any", arg)
              for arg, ty in cfg.signature.items() if ty[0] in "iu"}
    return found


def covering_sample(configs) -> list:
    """The fewest specialisations (greedily) that show every feature of ``configs``, heaviest first."""
    todo = set().union(*map(features, configs))

    def weight(cfg):
        return (len(features(cfg) & todo), cfg.num_warps,
                sum(math.log2(v) for v in cfg.constexprs.values() if type(v) is int and v > 0), cfg.name)

    sample = []
    while todo:
        best = max(configs, key=weight)
        sample.append(best)
        todo -= features(best)
    return sample


def calls_dot(fn, seen=None) -> bool:
    """Whether a Triton kernel, or a @triton.jit function it calls, calls tl.dot."""
    seen = set() if seen is None else seen
    seen.add(fn)
    src = inspect.getsource(fn.fn)
    if "tl.dot(" in src:
        return True
    return any(calls_dot(g, seen) for name, g in fn.fn.__globals__.items()
               if hasattr(g, "fn") and inspect.isfunction(g.fn) and g not in seen and f"{name}(" in src)


# In one child process with the interpreter off (the compiler needs it off, and so does compile_configs():
# the launch rules pick other tiles for the interpreter), every family's sample, each family's result or
# error on its own: one start-up (torch, Triton) instead of one per family.
_COMPILE_SAMPLES = """
import importlib, json, sys, traceback
from fastmvit.kernels.check import resource_usage
from tests.test_kernel_compile import calls_dot, covering_sample, features
results = {}
for family in sys.argv[1:]:
    try:
        configs = importlib.import_module(f"fastmvit.kernels.{family}").compile_configs()
        sample = covering_sample(configs)
        assert set().union(*map(features, sample)) == set().union(*map(features, configs))
        results[family] = {"names": [c.name for c in configs], "compiled": [
            dict(resource_usage(c, 90), kernel=c.fn.__name__, dot=calls_dot(c.fn), dtypes=list(c.signature.values()))
            for c in sample]}
    except Exception:
        results[family] = {"error": traceback.format_exc()[-3000:]}
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def compiled_samples():
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    run = subprocess.run([sys.executable, "-c", _COMPILE_SAMPLES, *FAMILIES], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not os.path.exists(CUOBJDUMP), reason="this Triton has no bundled cuobjdump")
@pytest.mark.parametrize("family", FAMILIES)
def test_sampled_specialisations_compile_for_sm90(family, compiled_samples):
    result = compiled_samples[family]
    assert "error" not in result, f"{family}:\n{result.get('error')}"
    assert result["compiled"], f"{family}: no specialisation compiled"
    for what, found in MUST_LIST.get(family, {}).items():
        assert found(set(result["names"])), f"{family}: no {what} among its specialisations"
    problems = []
    for use in result["compiled"]:
        if use["stack"]:
            problems.append(f"{use['name']}: {use['stack']} bytes of register spills")
        if use["dot"] and use["kernel"] not in NO_WGMMA and SIXTEEN_BIT & set(use["dtypes"]) and not use["wgmma"]:
            problems.append(f"{use['name']}: a 16-bit tl.dot without a Hopper warpgroup MMA")
    assert not problems, f"{len(problems)} of {len(result['compiled'])} compiled:\n" + "\n".join(problems)


def test_the_sample_covers_what_it_claims():
    """On a made-up set: a new tile value, a new flag and a new dtype each bring a specialisation in;
    one that only recombines covered values does not; the heaviest of equals is taken."""
    from fastmvit.kernels._common import CompileConfig

    def cfg(name, dt="fp16", warps=4, **cons):
        sig = {"x": f"*{dt}", "n": "i32", **{k: "constexpr" for k in cons}}
        return CompileConfig(name, _toy_kernel, sig, cons, warps, 3, aligned=("x", "n"))

    base = [cfg("a", BM=64, FLAG=False), cfg("b", BM=128, FLAG=False), cfg("c", BM=64, FLAG=True)]
    names = {c.name for c in covering_sample(base)}
    assert names == {"b", "c"}  # b: the larger tile covers BM=128 (and FLAG=False); c: FLAG=True
    assert len(covering_sample(base + [cfg("d", BM=128, FLAG=True)])) == 2  # d alone covers all of b and c
    assert {c.name for c in covering_sample(base + [cfg("e", dt="bf16", BM=64, FLAG=False)])} >= {"e"}
    assert {c.name for c in covering_sample(base + [cfg("f", warps=8, BM=64, FLAG=False)])} >= {"f"}


@triton.jit
def _toy_kernel(x, n):
    pass


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
