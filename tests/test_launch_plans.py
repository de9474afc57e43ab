"""Launch plans (fastmvit.engine.replay): the engine's forward resolved once per input signature and
replayed. A replay must give the same bits as the first call and as the registered ops, launch exactly the
same kernels, keep one plan per signature, and never go through torch's custom-op dispatch."""
import pytest
import torch

import fastmvit
from fastmvit.engine import Engine

from .kernels.common import DEVICE
from .utils import images, randomize_

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _engine(name, dtype=torch.float32, **load):
    ref = randomize_(fastmvit.load(name, pretrained=False, backend="torch", **load), seed=11).to(DEVICE)
    return ref, Engine(ref, torch.device(DEVICE), dtype)


@pytest.fixture
def checked(monkeypatch):
    monkeypatch.setattr(Engine, "check_replays", True)  # conftest turns it on too; these tests depend on it


def test_replays_give_the_same_bits_as_the_registered_ops(checked):
    """Real kernels (interpreted on a CPU) at a small map: registered ops, first call (recording), replay."""
    from fastmvit.engine import replay

    ref, engine = _engine("xxs")
    x = images((1, 3, 32, 32)).to(DEVICE)
    with torch.inference_mode():
        direct = engine.forward(x, replay.direct)
        first, again = engine(x), engine(x)
        expected = ref(x)
    assert len(engine._plans) == 1
    assert torch.equal(first, direct) and torch.equal(again, direct)
    torch.testing.assert_close(again, expected, rtol=0, atol=1e-3)


@pytest.mark.parametrize("name,size,numerics", [("s", (256, 256), "cvnets"), ("v2-1.0", (256, 256), "cvnets"),
                                                ("xs", (96, 80), "cvnets"), ("v2-0.5", (96, 80), "hf")])
def test_replays_launch_exactly_what_the_registered_ops_launch(name, size, numerics, checked, monkeypatch):
    """Every kernel launch (grid, scalars, constexprs, tensor shapes and strides) of a replay equals the
    registered ops' (stubbed: no kernel runs), and a replay never reaches torch's custom-op dispatch."""
    from fastmvit.benchmark.host import stubbed_launches
    from fastmvit.engine import replay

    _, engine = _engine(name, torch.float16, numerics=numerics)
    x = images((1, 3, *size)).to(DEVICE).half()
    through_ops, recorded, replayed = [], [], []
    with torch.inference_mode():
        with stubbed_launches(through_ops):
            engine.forward(x, replay.direct)
        with stubbed_launches(recorded):
            engine(x)
        with stubbed_launches(replayed), monkeypatch.context() as m:
            def refuse(*a, **k):
                raise AssertionError("a replay went through wrap_triton / the custom-op dispatch")

            m.setattr(torch.library, "wrap_triton", refuse)
            m.setattr(torch._library.custom_ops.CustomOpDef, "__call__", refuse)
            engine(x)
    assert len(through_ops) > 20
    keep = _persistent(engine, x)
    assert _buffers(recorded, keep) == _buffers(through_ops, keep)
    assert _buffers(replayed, keep) == _buffers(through_ops, keep)


def _persistent(engine, x) -> set:
    """Data pointers of the input and of every packed weight: the same in every forward."""
    ptrs, todo = {x.data_ptr()}, list(engine.steps)
    while todo:
        obj = todo.pop()
        if isinstance(obj, torch.Tensor):
            ptrs.add(obj.data_ptr())
        elif isinstance(obj, (list, tuple)):
            todo.extend(obj)
        elif hasattr(obj, "__dict__") and type(obj).__module__.startswith("fastmvit."):
            todo.extend(vars(obj).values())
    return ptrs


def _buffers(log, persistent):
    """The launches with each tensor's data pointer kept for the input and the weights, and otherwise
    replaced by the position of the first argument of the same launch that shares it: which arguments
    alias (a residual, a dummy pointer) is compared too, not only shapes and strides."""
    out = []
    for kernel, args, kwargs in log:
        first = {}
        described = []
        for i, a in enumerate(args):
            if isinstance(a, tuple) and a[:1] == ("tensor",):
                ptr = a[-1]
                a = (*a[:-1], ptr if ptr in persistent else ("fresh", first.setdefault(ptr, i)))
            described.append(a)
        out.append((kernel, tuple(described), kwargs))
    return out


def test_each_input_signature_gets_its_own_plan(checked, monkeypatch):
    from fastmvit.benchmark.host import stubbed_launches

    monkeypatch.setattr(Engine, "max_plans", 4)
    _, engine = _engine("xxs")
    base = images((2, 3, 64, 64)).to(DEVICE)
    inputs = [base, base[:1], base.contiguous(memory_format=torch.channels_last), base[1:],  # offset differs
              images((1, 3, 64, 96)).to(DEVICE)]
    with torch.inference_mode(), stubbed_launches():
        for x in inputs + inputs[-3:]:
            engine(x)
    assert len(engine._plans) == 4  # five signatures, the oldest dropped
    keys = list(engine._plans)
    assert keys[-1][0] == (1, 3, 64, 96) and (base.shape, base.stride(), 0, base.device) not in engine._plans


def test_a_diverging_replay_is_caught():
    from fastmvit.engine import replay
    from fastmvit.benchmark.host import stubbed_launches

    _, engine = _engine("xxs")
    with torch.inference_mode(), stubbed_launches():
        engine(images((1, 3, 64, 64)).to(DEVICE))
        calls = next(iter(engine._plans.values()))[0]
        run = replay.CheckedReplay(calls)
        with pytest.raises(RuntimeError, match="diverged at call 0"):
            engine.forward(images((2, 3, 64, 64)).to(DEVICE), run)
        short = replay.CheckedReplay(calls[:-1])
        with pytest.raises(RuntimeError, match="was not recorded"):
            engine.forward(images((1, 3, 64, 64)).to(DEVICE), short)


def test_gradients_still_reach_the_registered_ops_and_are_refused():
    _, engine = _engine("xxs")
    with pytest.raises(RuntimeError, match="inference-only"):
        engine(images((1, 3, 64, 64)).to(DEVICE).requires_grad_())


def test_bench_host_counts_launches_and_restores_the_kernels():
    from triton.runtime.jit import KernelInterface

    from fastmvit.benchmark import host
    from fastmvit.kernels import gemm

    row = host.measure("xxs", size=64, rounds=1, forwards=2, calls=True)
    assert row["launches"] > 20 and row["us_per_forward"] > 0 and row["python_calls"] > row["launches"]
    assert isinstance(gemm.gemm_kernel, KernelInterface) and "run" not in vars(gemm.gemm_kernel)
    assert "xxs" in host.format_rows([row])


def test_info_plan_lists_the_gpu_launches_with_grids_and_serial_steps(capsys):
    """MobileViT-S, batch 1, 256x256 with the GPU's launch rules: the review's independent counts (stage-5
    fusion conv 3 CTAs x 90 K-steps before the split rule, pooling GEMM 10 CTAs), one row per launch the
    engine makes, the split rule's decision beside the launches it judges."""
    from fastmvit.__main__ import main
    from fastmvit.engine import plan_info

    rows = plan_info.launches("s", 1)
    convs = [r for r in rows if r["kernel"] == "conv._conv3x3_kernel"]
    last = convs[-1]["split"]
    assert (last["ctas"], last["steps"]) == (3, 90) and last["n"] > 1  # split-K: n x 3 CTAs, 90 / n steps each
    assert (convs[-1]["ctas"], convs[-1]["steps"]) == (3 * last["n"], -(-90 // last["n"]))
    assert all(r["split"] is not None for r in convs)
    merges = [r for r in rows if r["kernel"] == "conv._splitk_merge_kernel"]
    assert len(merges) == sum(r["split"]["n"] > 1 for r in convs) == 2  # stage 5's local and fusion convs
    pooled = [r for r in rows if r["kernel"] == "gemm.gemm_kernel" and r["constexprs"]["POOL"]]
    assert [r["ctas"] for r in pooled] == [10] and pooled[0]["split"]["n"] == 1  # judged, never split
    for r in rows:
        assert r["ctas"] == int(torch.tensor(r["grid"]).prod()) and r["steps"] >= 1 and r["latency_us"] > 0
    blocks = plan_info.fusion_rows("s", 1)
    assert [b["fused"] for b in blocks] == [True] + [False] * 6 and blocks[-1]["fused_grid"] == "1 x 144"
    assert len(rows) == 7 + 2 + 1 + 6 * 3 + 9 + 43 + 1  # convs + merges, fused block, unfused blocks, attention,
    #                                                    GEMMs, pool
    assert main(["info", "--plan", "xxs", "--size", "64"]) == 0
    out = capsys.readouterr().out
    assert "launches" in out and "inverted residual" in out and "no split" in out


def test_info_plan_resources_compile_a_launch_for_sm90():
    from fastmvit.engine import plan_info

    row = next(r for r in plan_info.launches("xxs", 1, 64) if r["kernel"] == "gemm.gemm_kernel")
    (usage,) = plan_info.resources([row])
    assert usage is not None and usage["registers"] > 0 and usage["stack"] == 0 and 0 < usage["occupancy"] <= 1
