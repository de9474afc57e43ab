"""``python -m fastmvit info --plan s --batch 1``: every kernel the engine launches for one model and input
shape on a GPU, with its grid (CTAs), serial steps per CTA, the latency floor of the fuse-or-not rule's
model, and (``--resources``) registers and occupancy on sm_90 from an ahead-of-time compile.

No GPU is needed: the engine is built on CPU tensors, every launch is stubbed and logged
(``fastmvit.benchmark.host.stubbed_launches``), and the launchers resolve the GPU's launch rules, not the
interpreter's. So the first GPU visit can put predictions beside measurements.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Dict, List, Optional

import torch

# Where each kernel's arguments sit (pointers first, then scalars) and its serial loop, for the steps column.
_STEP_LATENCY = {"mv2_block": "STEP_FUSED", "dwconv": "STEP_DW"}  # every other loop: STEP_GEMM


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def serial_steps(kernel: str, args: tuple, meta: dict, grid: tuple = (1,)) -> int:
    """Dependent iterations of one CTA's main loop (each a tile load + dot), from the launch arguments."""
    if kernel == "gemm.gemm_kernel":
        K, tps = args[10], args[19]
        steps = _cdiv(K, meta["BK"]) * (2 if meta["NORM"] == 1 else 1)  # LayerNorm: a statistics pass over K
        return steps * (tps if meta["POOL"] else 1)
    if kernel == "conv._conv3x3_kernel":
        c1, c2 = args[7], args[8]
        steps = 1 if meta["FLAT_K"] else 9 * (_cdiv(c1, meta["BLOCK_K"]) + (_cdiv(c2, meta["BLOCK_K"]) if c2 else 0))
        return _cdiv(steps, grid[2]) if meta.get("SPLIT") else steps  # split-K: each split's share
    if kernel == "mv2_block._inverted_residual_kernel":
        return _cdiv(args[14], meta["BLOCK_H"]) * 9
    if kernel == "attention._patch_attention_kernel":
        return _cdiv(args[3], max(1, meta["BLOCK_N"] // meta["G"]))
    if kernel == "sepattn.context_kernel":
        steps = _cdiv(args[6] * args[7] // 4, meta["BT"])
        return _cdiv(steps, grid[2]) if meta.get("SPLIT") else steps
    if kernel == "pool.pool_linear_kernel":
        return _cdiv(args[5], meta["BHW"]) * _cdiv(args[6], meta["BK"])
    return 1  # dwconv: the nine taps are unrolled; the split merges: their loads are independent


def _scalar_type(v) -> str:
    if isinstance(v, bool):
        return "i1"
    return "i32" if isinstance(v, int) else "fp32"


def launches(model: str, batch: int, size: int = 256, dtype: torch.dtype = torch.float16) -> List[dict]:
    """Every kernel launch of one forward with the GPU's launch rules (see the module docstring)."""
    from fastmvit.engine.engine import Engine, prepare_kernels

    prepare_kernels(torch.device("cpu"))
    import fastmvit
    from fastmvit.benchmark.host import stubbed_launches
    from fastmvit.engine import replay
    from fastmvit.kernels import _common

    net = fastmvit.load(model, pretrained=False, backend="torch")
    engine = Engine(net, torch.device("cpu"), dtype)
    x = torch.zeros(batch, 3, size, size, dtype=dtype)
    log: list = []
    interpret, _common.INTERPRET = _common.INTERPRET, False  # the GPU's rules; nothing runs (stubbed)
    _common.SPLIT_LOG = log  # the split rule's decisions, each just before the launch it shapes
    try:
        with torch.inference_mode(), stubbed_launches(log):
            engine.forward(x, replay.direct)
    finally:
        _common.INTERPRET = interpret
        _common.SPLIT_LOG = None
    from fastmvit.ops import mv2_block as rule

    rows, decision = [], None
    for entry in log:
        if entry[0] == "split":
            decision = entry[1]
            continue
        kernel, args, kwargs = entry
        meta = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
        grid = kwargs["grid"]
        ctas = 1
        for g in grid:
            ctas *= g
        steps = serial_steps(kernel, args, meta, tuple(grid))
        step = getattr(rule, _STEP_LATENCY.get(kernel.split(".")[0], "STEP_GEMM"))
        per_sm = 1 if meta.get("num_warps", 4) == 8 else 2
        signature = [f"*{_common.TRITON_DTYPE[a[4]]}" if isinstance(a, tuple) and a[:1] == ("tensor",)
                     else _scalar_type(a) for a in args]
        aligned = [i for i, a in enumerate(args) if isinstance(a, int) and not isinstance(a, bool) and a % 16 == 0]
        rows.append({"kernel": kernel, "grid": tuple(grid), "ctas": ctas, "steps": steps,
                     "num_warps": meta.get("num_warps", 4), "num_stages": meta.get("num_stages", 3),
                     "latency_us": rule.latency(ctas, steps, step, per_sm) * 1e6,
                     "constexprs": {k: v for k, v in meta.items() if k not in ("num_warps", "num_stages")},
                     "signature": signature, "aligned": aligned,
                     "split": None if decision is None else decision._asdict()})
        decision = None
    return rows


def fusion_rows(model: str, batch: int, size: int = 256) -> List[dict]:
    """The fuse-or-not rule's estimate for each inverted residual block of ``model`` at this batch."""
    from fastmvit.ops import mv2_block as rule
    from fastmvit.variants import get_variant, make_divisible

    v = get_variant(model)
    side, ch, rows = _cdiv(size, 2), v.stem_channels, []
    for si, stage in enumerate(v.stages):
        for i in range(stage.num_ir):
            stride = stage.stride if i == 0 else 1
            hid = make_divisible(int(round(ch * stage.expand)), 8)
            est = rule.fusion_estimate(ch, hid, stage.out_channels, stride, height=side, width=side, batch=batch)
            ctas, steps, _ = rule.kernel_shapes(ch, hid, stage.out_channels, stride, height=side, width=side,
                                                batch=batch)["fused"]
            rows.append({"stage": si + 1, "block": f"{ch}->{hid}->{stage.out_channels} s{stride} @{side}x{side}",
                         "fused": rule.should_fuse(ch, hid, stage.out_channels, stride, height=side, width=side,
                                                   batch=batch),
                         "fused_us": est["fused"] * 1e6, "unfused_us": est["unfused"] * 1e6,
                         "fused_grid": f"{ctas} x {steps}"})
            side, ch = _cdiv(side, stride), stage.out_channels
    return rows


def resources(rows: List[dict], arch: int = 90) -> List[Optional[dict]]:
    """Registers, spills, shared memory and occupancy of each launch's specialisation on ``sm_<arch>``,
    compiled ahead of time in a subprocess (the kernels are interpreted in this one); None where the
    compile failed."""
    specs = [{k: r[k] for k in ("kernel", "signature", "aligned", "constexprs", "num_warps", "num_stages")}
             for r in rows]
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    out = subprocess.run([sys.executable, "-m", "fastmvit.engine.plan_info", str(arch)], input=json.dumps(specs),
                         capture_output=True, text=True, env=env, check=True).stdout
    return json.loads(out)


def _compile(spec: dict, arch: int) -> Optional[dict]:
    import importlib

    from fastmvit.kernels._common import CompileConfig
    from fastmvit.kernels.check import resource_usage

    module, name = spec["kernel"].split(".")
    fn = getattr(importlib.import_module(f"fastmvit.kernels.{module}"), name)
    names = fn.arg_names
    params = [n for n in names if n not in spec["constexprs"]]
    signature = dict(zip(params, spec["signature"]))
    signature.update({k: "constexpr" for k in spec["constexprs"]})
    signature = {n: signature[n] for n in names}
    cfg = CompileConfig(spec["kernel"], fn, signature, spec["constexprs"], spec["num_warps"], spec["num_stages"],
                        aligned=tuple(params[i] for i in spec["aligned"]))
    try:
        usage = resource_usage(cfg, arch)
    except Exception:
        return None
    regs, warps = usage["registers"], usage["num_warps"]
    by_regs = 65536 // max(1, regs * 32 * warps)
    by_smem = (228 * 1024) // usage["shared"] if usage["shared"] else 32
    ctas = max(0, min(by_regs, by_smem, 64 // warps))
    return {**usage, "ctas_per_sm": ctas, "occupancy": ctas * warps / 64}


def format_split(d: Optional[dict]) -> str:
    """One launch's split decision for the plan table ("" for kernels the rule does not judge)."""
    if not d:
        return ""
    if d["best_n"] == 1 and d["n"] == 1:
        return f"no split: {d['unsplit_s'] * 1e6:.1f} ({d['steps']} step{'s' if d['steps'] > 1 else ''})"
    est = f"{d['unsplit_s'] * 1e6:.1f} -> {d['split_s'] * 1e6:.1f} (n={d['best_n']})"
    if d["n"] > 1:
        return f"split {d['n']}{' forced' if d['forced'] else ''}: {est}"
    return f"{'never splits' if d['kernel'] == 'gemm pool' else 'no split'}: {est}"


def format_plan(rows: List[dict], blocks: List[dict], usage: Optional[List[Optional[dict]]] = None) -> str:
    lines = [f"{'#':>3} {'kernel':<36} {'grid':<14} {'CTAs':>6} {'steps':>6} {'warps':>5} {'latency us':>10} "
             f"{'split rule: unsplit -> split us':<34}" + ("  regs  spill  CTA/SM  occupancy" if usage is not None else "")]
    for i, r in enumerate(rows):
        line = (f"{i:>3} {r['kernel']:<36} {'x'.join(map(str, r['grid'])):<14} {r['ctas']:>6} {r['steps']:>6} "
                f"{r['num_warps']:>5} {r['latency_us']:>10.1f} {format_split(r.get('split')):<34}")
        if usage is not None:
            u = usage[i]
            line += (f"  {u['registers']:>4}  {u['stack']:>5}  {u['ctas_per_sm']:>6}  {u['occupancy']:>9.0%}"
                     if u else "  (compile failed)")
        lines.append(line)
    lines.append(f"{len(rows)} launches; latency: waves x steps x step latency of ops.mv2_block's model (a floor, "
                 f"not a prediction of the whole kernel)")
    lines.append("split rule (kernels._common.split_rule): waves x steps x step latency unsplit -> the best split by n "
                 "plus its merge pass; 'split n' where taken (>= 10 % faster, or forced by FASTMVIT_SPLIT), "
                 "'no split' where not, 'never splits' for a kernel judged only")
    lines.append("")
    lines.append(f"{'stage':>5} {'inverted residual':<30} {'rule':<8} {'fused us':>9} {'unfused us':>10} "
                 f"{'fused CTAs x steps':>19}")
    for b in blocks:
        lines.append(f"{b['stage']:>5} {b['block']:<30} {'fused' if b['fused'] else 'unfused':<8} "
                     f"{b['fused_us']:>9.1f} {b['unfused_us']:>10.1f} {b['fused_grid']:>19}")
    return "\n".join(lines)


def main(model: str, batch: int, size: int = 256, dtype: str = "float16", with_resources: bool = False) -> int:
    dt = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    rows = launches(model, batch, size, dt)
    usage = None
    if with_resources:
        usage = resources(rows)
    from fastmvit.kernels._common import sm_count

    print(f"{model}, batch {batch}, {size}x{size}, {dtype}: the GPU launch rules (sm_90, {sm_count('cpu')} SMs, "
          f"FASTMVIT_SM_COUNT to change)")
    print(format_plan(rows, fusion_rows(model, batch, size), usage))
    return 0


if __name__ == "__main__":  # the compile worker of ``resources``: specs on stdin, results on stdout
    from concurrent.futures import ProcessPoolExecutor

    _arch = int(sys.argv[1])
    _specs = json.loads(sys.stdin.read())
    _unique = {json.dumps(s, sort_keys=True): s for s in _specs}
    with ProcessPoolExecutor() as _pool:
        _done = dict(zip(_unique, _pool.map(_compile, _unique.values(), [_arch] * len(_unique))))
    print(json.dumps([_done[json.dumps(s, sort_keys=True)] for s in _specs]))
