"""The cold-start warm-up: recording the engine's launches without running them, merging them into
specialisations, compiling those in parallel (ahead of time for sm_90 on the CPU; into Triton's cache on a
GPU)."""
import json
import os
import subprocess
import sys

import pytest
import torch

import fastmvit
from fastmvit.engine import warmup as wu

from .kernels.common import ON_GPU, needs_gpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(extra)
    return env


@pytest.mark.skipif(ON_GPU, reason="the interpreted forward is the CPU's; on a GPU see the cache test")
def test_recording_sees_every_launch_the_forward_makes(monkeypatch):
    """The recorded launches (no kernel run) are, in order, those of a real forward (every kernel run)."""
    from triton.runtime.interpreter import InterpretedFunction

    model = fastmvit.load("xxs", pretrained=False, backend="triton")
    recorded = wu.record_launches(model, batches=[1], sizes=[(64, 64)])
    launched = []
    original = InterpretedFunction.run

    def spy(self, *args, grid, warmup, **kwargs):
        launched.append(wu._launch_of(self, args, kwargs))
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", spy)
    with torch.inference_mode():
        out = model(torch.rand(1, 3, 64, 64))
    assert not torch.isnan(out).any()
    assert launched == recorded
    assert len(wu.distinct(recorded)) < len(recorded)   # repeated blocks share specialisations


def test_reduced_arguments_merge_what_triton_would_merge():
    def kernel(a_ptr, n, eps, BLOCK: "tl.constexpr"):
        pass

    class Jit:
        fn = kernel

    x = torch.empty(64, dtype=torch.float16)
    one = wu._launch_of(Jit, (x, 32, 1e-5, 64), {"num_warps": 4})
    assert one == wu._launch_of(Jit, (x, 48, 1e-6), {"BLOCK": 64, "num_warps": 4})  # n % 16 == 0 both
    assert one != wu._launch_of(Jit, (x, 33, 1e-5, 64), {"num_warps": 4})       # n not a multiple of 16
    assert one != wu._launch_of(Jit, (x, 1, 1e-5, 64), {"num_warps": 4})        # 1 becomes a constexpr
    assert one != wu._launch_of(Jit, (x[1:], 32, 1e-5, 64), {"num_warps": 4})   # misaligned pointer
    assert one != wu._launch_of(Jit, (x, 32, 1e-5, 128), {"num_warps": 4})      # another constexpr
    assert one != wu._launch_of(Jit, (x, 32, 1e-5, 64), {"num_warps": 8})       # another option
    assert one != wu._launch_of(Jit, (x.float(), 32, 1e-5, 64), {"num_warps": 4})


def test_ahead_of_time_compile_in_parallel_and_failures_reported(tmp_path):
    """In a process with the interpreter off (the launchers then pick their GPU configurations): record
    xxs, compile one of its specialisations for sm_90 beside one that cannot compile, in two processes."""
    script = f"""
import dataclasses, json, fastmvit
from fastmvit.engine import warmup as wu
model = fastmvit.load("xxs", pretrained=False, backend="triton")
specs = wu.distinct(wu.record_launches(model, [1], [(64, 64)]))
gemm = next(s for s in specs if s.name == "gemm_kernel")
pool = next(s for s in specs if s.name == "pool_linear_kernel")
bad = dataclasses.replace(gemm, args=tuple((k, 48 if k == "BM" else v) for k, v in gemm.args))  # not a power of 2
seconds, failures, jobs = wu.compile_launches([pool, bad], target="sm_90", jobs=2)
json.dump({{"failures": failures, "jobs": jobs, "n": len(specs)}}, open({str(tmp_path / 'r.json')!r}, "w"))
"""
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=_env(TRITON_CACHE_DIR=str(tmp_path / "c")),
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.load(open(tmp_path / "r.json"))
    assert result["jobs"] == 2 and result["n"] > 10
    assert len(result["failures"]) == 1 and "BM=48" in result["failures"][0], result["failures"]


def test_command_line_errors_are_clear(capsys):
    with pytest.raises(SystemExit) as e:
        wu.main(["--batch", "0,8"])
    assert e.value.code == 2 and "positive integers" in capsys.readouterr().err
    with pytest.raises(ValueError, match="sm_<arch>"):
        wu.compile_launches([wu.Launch("m", "k", (), ())], target="gpu")


@needs_gpu
def test_after_the_warmup_the_first_forward_compiles_nothing(tmp_path):
    """Warm Triton's cache in parallel for S at batch 1 and 8, then run those forwards in a fresh
    process: no new entry may appear in the cache (every kernel came from the warm-up)."""
    cache = tmp_path / "triton"
    env = _env(TRITON_CACHE_DIR=str(cache))
    warm = subprocess.run([sys.executable, "-m", "fastmvit", "warmup", "--model", "s", "--dtype", "float16",
                           "--batch", "1,8"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert warm.returncode == 0, warm.stdout[-2000:] + warm.stderr[-2000:]
    before = {p for p in cache.rglob("*") if p.is_file()}
    script = """
import torch, fastmvit
m = fastmvit.load("s", pretrained=False, device="cuda", dtype=torch.float16, cuda_graphs=False)
with torch.inference_mode():
    for b in (1, 8):
        m(torch.rand(b, 3, 256, 256, device="cuda", dtype=torch.float16))
torch.cuda.synchronize()
"""
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    new = {p for p in cache.rglob("*") if p.is_file()} - before
    assert not new, sorted(str(p.relative_to(cache)) for p in new)[:10]


def test_ahead_of_time_for_sm80_records_the_sm80_launch_rules(tmp_path):
    """``--target sm_80`` records the launches sm_80's rules pick (fp32 GEMM tiles of 32 rows there, 64 on
    sm_90), not sm_90's; nothing is compiled here (compile_launches is replaced)."""
    script = f"""
import json, fastmvit
from fastmvit.engine import warmup as wu
seen = {{}}
def fake(launches, target, jobs=None, device_index=0):
    seen[target] = sorted({{dict(s.args)["BM"] for s in wu.distinct(launches) if s.name == "gemm_kernel"
                           and not dict(s.args)["POOL"]}})
    return 0.0, [], 1
wu.compile_launches = fake
model = fastmvit.load("xxs", pretrained=False, backend="triton")
for target in ("sm_80", "sm_90"):  # sm_90 after: the assumed arch is restored
    wu.warmup(model, [1], [(64, 64)], target=target)
json.dump(seen, open({str(tmp_path / 'r.json')!r}, "w"))
"""
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=_env(), capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    seen = json.load(open(tmp_path / "r.json"))
    assert 64 in seen["sm_90"] and 64 not in seen["sm_80"] and 32 in seen["sm_80"], seen
