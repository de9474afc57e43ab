"""CPU tests of the benchmark harness, the engines table, the roofline arithmetic and the report.
Nothing here times anything that matters: speed is never asserted."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import fastmvit
from fastmvit.benchmark import cli, engines as E, harness as H, kernels as K, peaks as P, report as R
from fastmvit.benchmark import results as RS, roofline as RL
from fastmvit.model.blocks import Attention
from fastmvit.variants import VARIANTS
from tests.kernels.common import DEVICE

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


# --------------------------------------------------------------------------------------------------
# Harness
# --------------------------------------------------------------------------------------------------

def test_stats_median_quartiles_and_spread():
    s = RS.Stats.from_seconds([0.004, 0.001, 0.003, 0.002, 0.005])
    assert (s.median, s.q1, s.q3, s.min, s.rounds) == (3.0, 2.0, 4.0, 1.0, 5)
    assert s.mean == pytest.approx(3.0) and s.std == pytest.approx(2 ** 0.5)
    one = RS.Stats.from_seconds([0.5])
    assert one.median == one.q1 == one.q3 == 500.0
    with pytest.raises(ValueError):
        RS.Stats.from_seconds([])


def test_budget_clamps_rounds():
    b = H.Budget(min_rounds=5, max_rounds=50, seconds=1.0)
    assert b.rounds_for(10.0) == 5 and b.rounds_for(0.1) == 10 and b.rounds_for(1e-6) == 50
    assert b.rounds_for(0.0) == 50


def test_measure_interleaved_counts_warmup_rounds_and_survives_a_broken_engine():
    calls = {"a": 0, "b": 0, "c": 0}

    def fn(name, fail_after=None):
        def call():
            calls[name] += 1
            if fail_after is not None and calls[name] > fail_after:
                raise RuntimeError(f"{name} broke")
        return call

    budget = H.Budget(warmup=2, min_rounds=4, max_rounds=4, seconds=0)
    out = H.measure_interleaved({"a": fn("a"), "b": fn("b", fail_after=4), "c": fn("c", fail_after=0)}, CPU,
                                budget, warmups={"a": 3})
    a_stats, a_warm = out["a"]
    assert isinstance(a_stats, RS.Stats) and a_stats.rounds == 4 and a_warm >= 0
    assert calls["a"] == 3 + 4                # 3 warm-up (engine asks for more), 4 timed
    assert isinstance(out["b"][0], RuntimeError)  # broke during timing: reported, others go on
    assert isinstance(out["c"][0], RuntimeError)  # broke in warm-up
    assert calls["c"] == 1


def test_measure_interleaved_rotates_which_engine_runs_first():
    """Each timed round starts one engine further on, so every engine follows every other equally often."""
    order = []
    budget = H.Budget(warmup=1, min_rounds=7, max_rounds=7, seconds=0)
    H.measure_interleaved({n: (lambda n=n: order.append(n)) for n in "abc"}, CPU, budget)
    timed = order[6:]  # per engine: one warm-up and one sizing call first
    assert len(timed) == 3 * 6
    rounds = [timed[i:i + 3] for i in range(0, len(timed), 3)]
    assert [r[0] for r in rounds] == list("bcabca") and all(sorted(r) == list("abc") for r in rounds)
    followers = {}
    for prev, nxt in zip(timed, timed[1:]):
        followers.setdefault(nxt, set()).add(prev)
    assert all(len(f) == 2 for f in followers.values())  # every engine after both others


def test_time_call_and_synchronized_on_cpu():
    assert H.time_call(lambda: sum(range(1000)), CPU) > 0
    seen = []
    H.synchronized(lambda: seen.append(1), CPU)()
    assert seen == [1]


def test_run_round_trip_and_schema_check(tmp_path):
    stats = RS.Stats(2.0, 1.5, 2.5, 1.0, 2.0, 0.1, 10)
    run = RS.Run({"device": "x"}, [RS.Result("s", 8, "float16", "fastmvit", "ok", ms=stats),
                                  RS.Result("s", 8, "float16", "timm-eager", "unavailable", "no timm")],
                [{"variant": "s"}], [{"family": "gemm"}])
    assert run.results[0].images_per_s == pytest.approx(4000.0)
    back = RS.Run.load(run.save(tmp_path / "r.json"))
    assert back.to_dict() == run.to_dict()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"schema": "something else"}))
    with pytest.raises(ValueError, match="not a fastmvit results file"):
        RS.Run.load(bad)


def test_environment_records_machine_versions_date_and_commit(monkeypatch):
    monkeypatch.setenv("FASTMVIT_GIT_COMMIT", "abc123")
    meta = RS.environment(CPU)
    assert meta["device"].startswith("CPU: ") and meta["git_commit"] == "abc123"
    assert meta["versions"]["torch"] == torch.__version__ and meta["date"][:2] == "20"
    monkeypatch.delenv("FASTMVIT_GIT_COMMIT")
    assert RS.git_commit()  # a sha, or "unknown" outside a checkout


def test_progress_degrades_to_plain_lines(capsys):
    assert list(H.progress(["a", "b"], 2, "sweep")) == ["a", "b"]
    err = capsys.readouterr().err
    assert "[1/2] sweep: a" in err and "[2/2] sweep: b" in err


# --------------------------------------------------------------------------------------------------
# Roofline
# --------------------------------------------------------------------------------------------------

def _hook_macs(name: str, size: int) -> int:
    """Multiply-accumulates of the real module tree, counted with forward hooks."""
    model = fastmvit.load(name, pretrained=False)
    total = [0]

    def conv(m, i, o):
        total[0] += o.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    def linear(m, i, o):
        total[0] += o.numel() * m.in_features

    def attention(m, i, o):
        b, n, c = i[0].shape
        total[0] += 2 * b * n * n * c  # q k^T and attn v, all heads

    for m in model.modules():
        hook = {nn.Conv2d: conv, nn.Linear: linear, Attention: attention}.get(type(m))
        if hook:
            m.register_forward_hook(hook)
    with torch.inference_mode():
        model(torch.rand(1, 3, size, size))
    return total[0]


@pytest.mark.parametrize("name", list(VARIANTS))
def test_profile_matches_the_model_and_the_variant_table(name):
    v = VARIANTS[name]
    p = RL.profile(name)
    assert abs(p.macs - v.gmacs * 1e9) <= 0.5e6  # the table rounds to 0.001 GMACs
    assert p.weights + p.bn_channels == v.params          # folded weights + folded-away BN == parameters
    small = RL.profile(name, 64)
    assert small.macs == _hook_macs(name, 64)
    if v.family == "v2":
        assert p.extra_macs > 0
    assert p.flops == 2 * (p.macs + p.extra_macs)


def test_profile_traffic_orders_the_plans_and_scales_with_batch():
    for name in VARIANTS:
        p = RL.profile(name)
        for dtype in ("float32", "float16"):
            ideal, fused, layer = (p.bytes(plan, 8, dtype) for plan in RL.PLANS)
            assert ideal < fused < layer
            b1, b9 = p.bytes("fastmvit", 1, dtype), p.bytes("fastmvit", 9, dtype)
            assert b9 - b1 == 8 * (b1 - p.weights * RL.DTYPE_BYTES[dtype])  # weights once, the rest per image
        assert p.kernels["ideal"] == 1 and p.kernels["fastmvit"] < p.kernels["layerwise"]
    with pytest.raises(ValueError):
        RL.profile("s", 224)


def test_layerwise_plan_reproduces_the_issues_bound():
    """The issue: writing and reading every layer's output once in float16 bounds an H100 (3.35 TB/s)
    at roughly 40,000 images/s for MobileViT-S."""
    p = RL.profile("s")
    rate = 256 / (p.bytes("layerwise", 256, "float16") / 3.35e12)
    assert 35_000 < rate < 50_000


def test_stem_and_first_block_traffic_by_hand():
    """xxs at 64x64: stem writes 16x32x32; layer1's fused inverted residual reads that and writes 16x32x32."""
    p = RL.Profile("xxs", 64)
    RL._conv(p, 3, 16, 3, 32 * 32)
    p.add(RL.BOTH, 0, 16 * 32 * 32)
    before = dict(p.traffic)
    RL._inverted_residual(p, 16, 16, 1, 2, 32 * 32)
    assert p.traffic["fastmvit"] - before["fastmvit"] == 2 * 16 * 1024
    # layerwise: expand 16->32, depthwise 32->32, project 32->16 plus the residual read
    assert p.traffic["layerwise"] - before["layerwise"] == (16 + 32 + 32 + 32 + 32 + 16 + 16) * 1024


def test_floor_picks_the_binding_resource():
    p = RL.profile("s")
    slow_memory = {"bandwidth_GBps": 1.0, "tflops": {"float16": 1000.0}}
    slow_math = {"bandwidth_GBps": 1e6, "tflops": {"float16": 0.001}}
    f = RL.floor(p, "fastmvit", 4, "float16", slow_memory)
    assert f["bound"] == "memory" and f["ms"] == pytest.approx(p.bytes("fastmvit", 4, "float16") / 1e9 * 1e3)
    g = RL.floor(p, "fastmvit", 4, "float16", slow_math)
    assert g["bound"] == "compute" and g["ms"] == pytest.approx(4 * p.flops / 1e9 * 1e3)
    assert RL.floor(p, "fastmvit", 4, "bfloat16", slow_math) is None  # no peak for that dtype
    row = RL.roofline_row("s", 256, "float16", slow_memory)
    assert set(row["floor_ms"]) == set(RL.PLANS) and row["floor_ms"]["ideal"] < row["floor_ms"]["layerwise"]
    assert RL.roofline_row("s", 1, "float16", {})["floor_ms"] == {}


# --------------------------------------------------------------------------------------------------
# Peaks
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,key,bw", [("NVIDIA H100 80GB HBM3", "H100", 3350), ("NVIDIA H100 PCIe", "H100 PCIe", 2000),
                                          ("NVIDIA H200", "H200", 4800), ("NVIDIA A100-SXM4-80GB", "A100-SXM4-80GB", 2039)])
def test_datasheet_lookup(name, key, bw):
    d = P.datasheet(name)
    assert d["bandwidth_GBps"] == bw and d["source"]["bandwidth_GBps"] == f"datasheet ({key})"
    assert d["tflops"]["float16"] > d["tflops"]["float32"]


def test_peaks_measured_on_cpu_and_labelled():
    assert P.datasheet("Some Unknown GPU") is None
    peak = P.device_peak(CPU, "cpu", measure_peak=True, dtypes=("float32",))
    assert peak["bandwidth_GBps"] > 0 and peak["tflops"]["float32"] > 0
    assert peak["source"]["tflops.float32"].startswith("measured")
    assert "GB/s" in P.format_peak(peak)
    assert P.device_peak(CPU, "cpu", measure_peak=False) == {"tflops": {}, "source": {}}


# --------------------------------------------------------------------------------------------------
# Engines
# --------------------------------------------------------------------------------------------------

def test_engine_table_and_selection():
    assert {"fastmvit", "fastmvit-nograph", "torch-eager", "torch-autocast", "torch-channels-last", "hf-eager",
            "timm-eager", "compile", "compile-reduce-overhead", "compile-max-autotune"} <= set(E.ENGINES)
    assert [e.name for e in E.select(None, CPU)] == E.QUICK["cpu"]
    cuda = [e.name for e in E.select(None, torch.device("cuda"), compiled=True, max_autotune=True)]
    assert cuda == E.QUICK["cuda"] + E.COMPILED + ["compile-max-autotune"]
    assert E.ENGINES["compile-max-autotune"].opt_in
    with pytest.raises(ValueError, match="unknown engine"):
        E.select(["nope"], CPU)


def test_unavailable_engines_say_why(monkeypatch):
    with pytest.raises(E.Unavailable, match="autocast"):
        E.ENGINES["torch-autocast"].check(CPU, "float32")
    with pytest.raises(E.Unavailable, match="CUDA graphs"):
        E.ENGINES["fastmvit-nograph"].check(CPU, "float32")
    with pytest.raises(E.Unavailable, match="CUDA only"):
        E.ENGINES["compile-reduce-overhead"].check(CPU, "float32")
    E.ENGINES["fastmvit"].check(CPU, "float32")  # on the CPU, backend="auto" is the torch path
    monkeypatch.setattr(E, "_import_problem", lambda m: f"{m} is not importable (test)")
    with pytest.raises(E.Unavailable, match="timm is not importable"):
        E.ENGINES["timm-eager"].check(CPU, "float32")


def test_fastmvit_engines_pass_backend_and_cuda_graphs(monkeypatch):
    seen = {}
    real_load = fastmvit.load

    def load(name, weights=None, *, backend=None, cuda_graphs=None, **kw):
        seen.update(backend=backend, cuda_graphs=cuda_graphs)
        return real_load(name, weights, **kw)

    monkeypatch.setattr(fastmvit, "load", load)
    E.ENGINES["fastmvit"].build("xxs", 1, "float32", CPU, 32)
    assert seen == {"backend": "auto", "cuda_graphs": True}
    E.ENGINES["torch-eager"].build("xxs", 1, "float32", CPU, 32)
    assert seen == {"backend": "torch", "cuda_graphs": None}


def test_eager_engines_compute_the_same_logits():
    """Every eager engine the CPU table lists against an independent one: Hugging Face's model in float64
    (fastmvit, torch-eager and torch-channels-last are all fastmvit's torch path on a CPU; timm too where
    it imports). Bound: FACTOR x HF's own float32 error plus a few ulps; every engine got the same input.
    Autocast (bfloat16) within FACTOR x the bfloat16-cast torch path's error: measured, not a fraction of
    the largest logit."""
    pytest.importorskip("transformers")
    from tests.utils import FACTOR, REL_FLOOR, max_err

    names = ["torch-eager", "torch-channels-last", "fastmvit", "hf-eager"]
    names += [] if E._import_problem("timm") else ["timm-eager"]
    built = {n: E.ENGINES[n].build("xs", 2, "float32", CPU, 64) for n in names}
    hf = built["hf-eager"]
    x = hf.x
    hf64 = E._HFLogits(E.hf_model("xs")).double()
    with torch.inference_mode():
        ref64 = hf64(x.double())
    bound = FACTOR * max_err(hf.fn(), ref64) + REL_FLOOR[torch.float32] * ref64.abs().max().item()
    for name, prepared in built.items():
        assert torch.equal(prepared.x.contiguous(), x), f"{name} got another input"
        assert max_err(prepared.fn(), ref64) <= bound, (name, max_err(prepared.fn(), ref64), bound)
    amp = E.ENGINES["torch-autocast"].build("xs", 2, "bfloat16", CPU, 64)
    assert amp.x.dtype == torch.float32 and torch.equal(amp.x, x)
    bf16 = E.ENGINES["torch-eager"].build("xs", 2, "bfloat16", CPU, 64)
    amp_bound = FACTOR * max_err(bf16.fn(), ref64) + REL_FLOOR[torch.bfloat16] * ref64.abs().max().item()
    amp_err = max_err(amp.fn(), ref64)
    assert bound < amp_err <= amp_bound, (amp_err, bound, amp_bound)  # autocast applied, and within bfloat16 error


def test_segmentation_engines_compute_the_same_logits():
    """deeplabv3-<variant> runs in the benchmark: fastmvit and HF on the same reference weights agree."""
    pytest.importorskip("transformers")
    outs = {n: E.ENGINES[n].build("deeplabv3-xxs", 1, "float32", CPU, 64).fn() for n in
            ("torch-eager", "hf-eager", "fastmvit")}
    ref = outs.pop("torch-eager")
    assert ref.shape == (1, 21, 4, 4) and ref.abs().max() > 0.1
    for name, out in outs.items():
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=0, msg=name)
    with pytest.raises(E.Unavailable, match="timm has no MobileViT segmentation"):
        E._timm_model("deeplabv3-xxs")


def test_compiled_engine_resets_dynamo_and_maps_modes(monkeypatch):
    import torch._dynamo as dynamo

    modes, resets = [], []
    monkeypatch.setattr(torch, "compile", lambda model, mode=None, dynamic=None: modes.append(mode) or model)
    monkeypatch.setattr(dynamo, "reset", lambda: resets.append(1))
    p = E.ENGINES["compile"].build("xxs", 1, "float32", CPU, 32)
    assert p.fn().shape == (1, 1000)
    p.close()
    E.ENGINES["compile-max-autotune"].build("xxs", 1, "float32", CPU, 32)
    assert modes == [None, "max-autotune"] and len(resets) == 3


def test_reference_weights_are_seeded_and_non_trivial():
    a, b = E.reference_weights("xxs"), E.reference_weights("xxs", seed=1)
    assert not torch.equal(a["stem.bn.running_var"], b["stem.bn.running_var"])
    assert (a["stem.bn.running_var"] != 1).all()


# --------------------------------------------------------------------------------------------------
# Kernel microbenchmark table
# --------------------------------------------------------------------------------------------------

def test_kernel_cases_cover_every_family_and_report_cpu_as_unavailable():
    cases = K.cases(batch=2)
    assert {c.family for c in cases} == {"attention", "sepattn", "dwconv", "gemm", "pool", "conv", "mv2_block"}
    attn = next(c for c in cases if c.family == "attention")
    assert attn.name == "B2-H32W32-d144-h4" and attn.flops == 16 * 2 * 256 * 256 * 144
    assert attn.nbytes(torch.float16) == 2 * 32 * 32 * 4 * 144 * 2
    assert all(c.flops > 0 and c.nbytes(torch.float32) > 0 for c in cases)
    row = K.measure_case(attn, CPU, torch.float16, {})
    assert row["status"] == "unavailable" and "CUDA" in row["reason"]
    with pytest.raises((ImportError, AttributeError)):
        K._op("no_such_family", "x")


SMALL_CASES = [K._attention(1, 4, 6, 32, 4), K._sepattn(1, 4, 6, 16), K._dwconv(1, 6, 6, 16, 2),
               K._conv3x3(1, 8, 8, 3, 16, 2, nchw=True), K._conv3x3(1, 6, 6, 32, 16, 1, two_inputs=True),
               K._inverted_residual(1, 6, 6, 16, 32, 24, 2), K._gemm(24, 32, 96, layer_norm=True),
               K._gemm(24, 64, 32, act=True, residual=True), K._pool_linear(2, 2, 2, 32, classes=10)]


@pytest.mark.parametrize("case", SMALL_CASES, ids=lambda c: f"{c.family}-{c.name}")
def test_kernel_adapters_call_the_ops_as_documented(case):
    """Each adapter against the op it wraps, at a tiny shape (Triton interpreter on the CPU): the fused op
    and its reference must agree. A renamed function or a changed signature fails here instead of turning
    into "unavailable" rows on a GPU."""
    fused, eager = case.make(torch.device(DEVICE), torch.float32)  # the interpreter on a CPU-only machine
    torch.testing.assert_close(fused(), eager(), atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------

def _synthetic_run() -> RS.Run:
    """A GPU-like run (numbers made up for the test) with every engine the targets need."""
    ms = {("fastmvit", 1): 0.15, ("torch-eager", 1): 3.0, ("compile-reduce-overhead", 1): 0.4,
          ("fastmvit", 256): 8.0, ("torch-autocast", 256): 20.0, ("compile-max-autotune", 256): 10.0,
          ("torch-eager", 256): 30.0}
    results = [RS.Result("s", b, "float16", e, "ok", ms=RS.Stats(t, t * 0.95, t * 1.05, t * 0.9, t, t * 0.05, 20))
               for (e, b), t in ms.items()]
    results.append(RS.Result("s", 1, "float16", "timm-eager", "unavailable", "timm is not importable"))
    peak = {"bandwidth_GBps": 3350, "tflops": {"float16": 989}, "source": {"bandwidth_GBps": "datasheet (H100)"}}
    meta = {"device": "NVIDIA H100 80GB HBM3", "date": "2026-01-01T00:00:00+00:00", "git_commit": "abc",
            "versions": {"torch": "2.11", "triton": "3.6"}, "peak": peak, "command": "test"}
    run = RS.Run(meta, results)
    run.roofline = [RL.roofline_row("s", b, "float16", peak) for b in (1, 256)]
    run.kernels = [{"family": "gemm", "case": "M1-K2-N3", "dtype": "float16", "status": "ok", "bound": "memory",
                    "speedup": 2.0, "fused": {"ms": 0.1, "GBps": 2000.0, "TFLOPs": 1.0, "pct_bandwidth": 60.0,
                                              "pct_flops": 0.1}, "eager": {"ms": 0.2}},
                   {"family": "attention", "case": "x", "dtype": "float16", "status": "unavailable", "reason": "not built"}]
    return run


def test_targets_speedups_and_roofline_share():
    run = _synthetic_run()
    t = {x["target"]: x for x in R.targets(run)}
    assert t["batch 256: >= 3x eager PyTorch with autocast"]["met"] is False   # 20 / 8 = 2.5x
    assert t["batch 256: >= 1.5x torch.compile max-autotune"]["met"] is False  # 1.25x
    assert t["batch 1: >= 15x eager PyTorch"]["met"] is True                   # 20x
    assert t["batch 1: >= 2x torch.compile reduce-overhead"]["met"] is True
    assert t["batch 1: under 0.2 ms"]["met"] is True
    r = next(r for r in run.results if (r.engine, r.batch) == ("fastmvit", 256))
    assert R.speedup(run.results, r, R.baseline(run.results, "s", "float16")) == pytest.approx(30 / 8)
    floor = next(x for x in run.roofline if x["batch"] == 256)["floor_ms"]["fastmvit"]
    assert R.roofline_share(run, r) == pytest.approx(100 * floor / 8.0)
    assert R.targets(RS.Run({}, []))[0]["met"] is None


def test_markdown_and_terminal_render(tmp_path):
    run = _synthetic_run()
    md = R.render_markdown(run, ["throughput.png"])
    for needle in ("NVIDIA H100 80GB HBM3", "2026-01-01", "`abc`", "## Targets", "| fastmvit |", "batch 256",
                   "Speed-up over torch-eager", "## Roofline", "## Kernels", "60%", "not built",
                   "timm is not importable", "![throughput](throughput.png)"):
        assert needle in md, needle
    text = R.render_terminal(run)
    assert "fastmvit" in text and "images/s" in text and "timm-eager (unavailable" in text
    assert "NOT MET  batch 256: >= 3x eager PyTorch with autocast: 2.50x" in text


def test_report_writes_markdown_and_plots(tmp_path):
    run = _synthetic_run()
    out = R.write_report(run, tmp_path, plots=False)
    assert out["markdown"].read_text().startswith("# fastmvit benchmark") and out["plots"] == []
    pytest.importorskip("matplotlib")
    out = R.write_report(run, tmp_path)
    assert sorted(p.name for p in out["plots"]) == ["roofline.png", "speedup.png", "throughput.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in out["plots"])


@pytest.mark.parametrize("path", sorted((ROOT / "bench" / "results").glob("*/results.json")), ids=str)
def test_committed_results_render(path, tmp_path):
    run = RS.Run.load(path)
    assert run.meta["device"] and run.meta["date"] and run.meta["versions"]["torch"]
    assert "# fastmvit benchmark" in R.render_markdown(run)


# --------------------------------------------------------------------------------------------------
# Command line, end to end on tiny settings
# --------------------------------------------------------------------------------------------------

def test_run_matrix_records_ok_unavailable_and_parity():
    pytest.importorskip("transformers")
    engines = [E.ENGINES[n] for n in ("fastmvit", "hf-eager", "fastmvit-nograph")]
    res = cli.run_matrix(["xxs"], [1], ["float32"], engines, CPU, H.Budget(warmup=1, min_rounds=2, max_rounds=2,
                                                                            seconds=0), size=32, show_progress=False)
    by = {r.engine: r for r in res}
    assert by["fastmvit"].status == by["hf-eager"].status == "ok"
    assert by["fastmvit"].ms.rounds == 2 and by["fastmvit"].images_per_s > 0
    assert by["hf-eager"].max_abs_diff < 1e-4 and by["fastmvit"].max_abs_diff < 1e-5
    assert by["fastmvit-nograph"].status == "unavailable"


def test_cli_bench_then_report(tmp_path, capsys):
    from fastmvit.__main__ import main

    out = tmp_path / "r.json"
    assert main(["bench", "--device", "cpu", "--models", "xxs", "--batches", "1", "--size", "64", "--seconds", "0", "--min-rounds", "2",
                 "--engines", "fastmvit,fastmvit-nograph", "--no-measure-peak", "--quiet", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "fastmvit" in text and "ms/batch" in text and "not measured" in text
    run = RS.Run.load(out)
    assert [r.status for r in run.results][0] == "ok" and run.roofline[0]["size"] == 64
    assert main(["bench", "report", str(out), "--out", str(tmp_path / "rep"), "--no-plots"]) == 0
    assert "## xxs | float32 | 64x64" in (tmp_path / "rep" / "report.md").read_text()
    assert main(["bench", "engines"]) == 0
    assert "compile-max-autotune" in capsys.readouterr().out
    assert main(["bench", "roofline", "--device", "cpu", "--models", "s", "--batches", "1,256", "--dtypes", "float16",
                 "--no-measure-peak"]) == 0
    assert "## Roofline" in capsys.readouterr().out
    assert main(["bench", "--engines", "nope"]) == 2


TINY = ["bench", "--device", "cpu", "--models", "xxs", "--batches", "1", "--size", "64", "--seconds", "0",
        "--min-rounds", "2", "--warmup", "1", "--engines", "fastmvit,torch-eager", "--quiet"]


def test_bench_labels_rows_and_warns_when_the_machine_was_busy(tmp_path, capsys, monkeypatch):
    """Load injected into the function that reads it: with other work on every CPU the table says the
    machine was busy, marks its ratios doubtful and asks for a quieter rerun; without, it does not. Either
    way each row says what it runs here (on a CPU "fastmvit" is the torch path, and its logits check is a
    comparison with itself)."""
    from fastmvit.__main__ import main

    cpus = RS.cpu_count()
    monkeypatch.setattr(RS, "load_average", lambda: [4.0 * cpus, 3.0 * cpus, 2.0 * cpus])
    assert main(TINY + ["--no-measure-peak", "--json", str(tmp_path / "busy.json")]) == 0
    captured = capsys.readouterr()
    text = captured.out
    assert f"note: the machine is busy (load average {4.0 * cpus:.1f} on {cpus} CPUs" in captured.err
    assert "WARNING: the machine was busy while measuring" in text and "rerun when it is quiet" in text
    assert "--threads 1" in text
    rows = [line for line in text.splitlines() if line.startswith("xxs ")]
    assert len(rows) == 2 and all("x?" in row for row in rows)  # every speed-up marked doubtful
    assert RS.Run.load(tmp_path / "busy.json").meta["busy"]
    legend = text[text.index("what each row runs on this device:"):text.index("model ")]
    fast = next(line for line in legend.splitlines() if line.strip().startswith("fastmvit "))
    kind = E.ENGINES["fastmvit"].runs_on(CPU)[0]  # the CPU engine where a runtime is installed, else the torch path
    assert kind in ("CPU engine", "torch path") and f"fastmvit                 {kind}:" in fast
    diffs = {row.split()[3]: row.split()[-1] for row in rows}
    assert diffs["torch-eager"] == "self"  # it runs the reference path: no check claimed
    assert (diffs["fastmvit"] == "self") == (kind == "torch path")

    monkeypatch.setattr(RS, "load_average", lambda: [0.0, 0.0, 0.0])
    assert main(TINY + ["--no-measure-peak"]) == 0
    captured = capsys.readouterr()
    assert "busy" not in captured.out + captured.err and "x?" not in captured.out


def test_busy_reasons_read_the_load_and_the_spread_of_repeated_peaks(monkeypatch):
    cpus = RS.cpu_count()
    quiet = {"cpus": cpus, "threads": cpus, "device_type": "cpu", "load_average": [0.2, 0.2, 0.2],
             "load_average_end": [cpus + 0.2, 1, 1], "peak": {"spread": {"bandwidth_GBps": 1.1}}}
    assert RS.busy_reasons(quiet) == []  # this run's own threads are not "other work"
    assert RS.busy_reasons(dict(quiet, load_average_end=[2.5 * cpus + 1, 1, 1]))[0].startswith("load average")
    spread = RS.busy_reasons(dict(quiet, peak={"spread": {"tflops.float32": 3.0}}))
    assert spread == ["the repeated peak measurements varied up to 3.0x (tflops.float32)"]
    # peaks.measure records how far its repeats varied: varying timings injected where it reads the clock
    times = iter([0.010, 0.030, 0.010, 0.010, 0.010] + [0.02] * 5)
    monkeypatch.setattr(P, "time_call", lambda fn, device: next(times))
    peak = P.measure(CPU, dtypes=("float32",))
    assert peak["spread"] == {"bandwidth_GBps": pytest.approx(3.0), "tflops.float32": pytest.approx(1.0)}


def test_bench_engines_says_what_runs_here():
    """On a CPU-only machine no engine claims the fused kernels: "fastmvit" is listed as the torch path."""
    from fastmvit.__main__ import main

    if torch.cuda.is_available():
        pytest.skip("lists the fused engine on CUDA")
    kind, what = E.ENGINES["fastmvit"].runs_on(CPU)
    assert kind in ("CPU engine", "torch path") and what.startswith(kind)
    assert E.ENGINES["torch-eager"].computes_reference(CPU)
    assert E.ENGINES["fastmvit"].computes_reference(CPU) == (kind == "torch path")
    assert not E.ENGINES["torch-channels-last"].computes_reference(CPU)
    assert E.ENGINES["hf-eager"].runs_on(CPU)[0] == "HF transformers"
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["bench", "engines", "--device", "cpu"]) == 0
    lines = {line.split()[0]: line for line in out.getvalue().splitlines()[1:]}
    assert f" {kind}: " in lines["fastmvit"] and "fused kernels" not in lines["fastmvit"]
    assert "unavailable" in lines["fastmvit-nograph"]
    available = [line for line in lines.values() if line.rstrip().endswith(("available", "(opt-in)"))
                 and "unavailable" not in line]
    assert available and not any(" fused engine: " in line or "fused kernels" in line for line in available)


def test_import_is_light_and_bench_suite_collects_without_running():
    code = ("import sys, fastmvit.benchmark; "
            "print([m for m in ('transformers', 'timm', 'matplotlib', 'triton') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"
    col = subprocess.run([sys.executable, "-m", "pytest", "bench", "--collect-only", "-q", "-p", "no:cacheprovider"],
                         capture_output=True, text=True, cwd=ROOT)
    assert col.returncode == 0, col.stdout + col.stderr
    ids = [line for line in col.stdout.splitlines() if "::test_" in line]
    assert any("test_model[xxs-b1-fp32-fastmvit]" in i for i in ids) and any("test_kernel" in i for i in ids)


def test_merge_runs_of_one_device_and_refuse_mixed(tmp_path):
    a, b = _synthetic_run(), _synthetic_run()
    b.results = [RS.Result("s", 1, "float16", "compile", "ok", ms=RS.Stats(1, 1, 1, 1, 1, 0, 5))]
    b.results.append(RS.Result("s", 1, "float16", "fastmvit", "ok", ms=RS.Stats(0.1, 0.1, 0.1, 0.1, 0.1, 0, 5)))
    m = RS.Run.merge([a, b])
    assert len(m.results) == len(a.results) + 1 and len(m.meta["merged_from"]) == 2
    fast = [r for r in m.results if (r.engine, r.batch) == ("fastmvit", 1)]
    assert len(fast) == 1 and fast[0].ms.median == 0.1  # the later file wins
    b.meta = dict(b.meta, device="other")
    with pytest.raises(ValueError, match="different devices"):
        RS.Run.merge([a, b])
    pa, pb = a.save(tmp_path / "a.json"), b.save(tmp_path / "b.json")
    from fastmvit.__main__ import main

    assert main(["bench", "report", str(pa), str(pb), "--no-plots"]) == 2
