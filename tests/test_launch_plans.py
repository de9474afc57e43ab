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
                                                ("xs", (96, 80), "cvnets"), ("v2-0.5", (96, 80), "hf"),
                                                ("deeplabv3-xxs", (96, 80), "cvnets"),
                                                ("deeplabv3-v2-0.5", (64, 64), "cvnets")])
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


def _counting_rule(monkeypatch, fuse_when_batch=None):
    """Replace ``mv2_block.should_fuse`` by a counter (answering "fuse" for one batch size, if given, else
    the real rule's answer): how often the engine asks the fuse-or-not rule."""
    from fastmvit.ops import mv2_block

    real, asked = mv2_block.should_fuse, []

    def rule(*args, **kwargs):
        asked.append(kwargs["batch"])
        return real(*args, **kwargs) if fuse_when_batch is None else kwargs["batch"] == fuse_when_batch

    monkeypatch.setattr(mv2_block, "should_fuse", rule)
    return asked


def test_the_fuse_rule_is_answered_once_per_signature(checked, monkeypatch):
    """The inverted residual's fuse-or-not rule reads only the input's shape: it is asked when a signature
    is recorded, never on a replay, and each signature keeps its own answer (batch 2 fuses every block
    here, batch 1 none), so a replay launches what its own recording launched."""
    from fastmvit.benchmark.host import stubbed_launches

    asked = _counting_rule(monkeypatch, fuse_when_batch=2)
    _, engine = _engine("s", torch.float16)
    blocks = sum(type(s).__name__ == "InvertedResidualStep" for s in engine.steps)
    one, two = images((1, 3, 64, 64)).half().to(DEVICE), images((2, 3, 64, 64)).half().to(DEVICE)
    with torch.inference_mode():
        with stubbed_launches():
            engine(one), engine(two)
        assert sorted(asked) == [1] * blocks + [2] * blocks and len(engine._plans) == 2
        asked.clear()
        for x, fused in ((two, blocks), (one, 0), (two, blocks)):
            with stubbed_launches() as launches:
                engine(x)
            assert launches.get("mv2_block._inverted_residual_kernel", 0) == fused
            assert launches.get("dwconv._dwconv3x3_kernel", 0) == blocks - fused
    assert asked == []


def test_a_rebuilt_engine_asks_the_fuse_rule_again(monkeypatch):
    """The rule's answers live in the engine's launch plans, so whatever rebuilds the engine (numerics,
    dtype, weights) asks it again rather than replaying a stale answer."""
    from fastmvit.benchmark.host import stubbed_launches
    from fastmvit.model import Numerics

    asked = _counting_rule(monkeypatch)
    model = fastmvit.load("v2-0.5", pretrained=False, backend="triton", device=DEVICE)
    x = images((1, 3, 64, 64)).to(DEVICE)
    with torch.inference_mode(), stubbed_launches():
        model(x)
        blocks = len(asked)
        assert blocks > 0
        model(x)
        assert len(asked) == blocks                          # replayed
        model.set_numerics(Numerics(v2_odd_size="hf"))
        model(x)
        assert len(asked) == 2 * blocks                      # a new engine: asked again
        model.half()
        model(x.half())
        assert len(asked) == 3 * blocks


def test_context_plan_turns_a_4d_qkv_into_rows_on_every_call():
    """``sepattn_context_plan`` decides once whether qkv needs turning into [rows, C] (here a 4-D map that
    is not row-contiguous: a copy); each call of the plan then does it, and agrees with the op."""
    from fastmvit.ops.sepattn import sepattn_context, sepattn_context_plan

    B, H, W, d = 1, 4, 6, 16
    g = torch.Generator().manual_seed(3)

    def qkv():  # [B, H, W, 1 + 2d] as a transposed view: rows are not contiguous
        return torch.randn(B, W, H, 1 + 2 * d, generator=g).to(DEVICE).transpose(1, 2)

    plan = sepattn_context_plan(qkv(), d)
    x = qkv()
    torch.testing.assert_close(plan(x, d), sepattn_context(x, d), rtol=0, atol=0)


def test_replayed_outputs_are_allocated_as_torch_empty_would(monkeypatch):
    """A replay allocates its outputs from a prototype per (dtype, device) (``empty_output(..., traced=False)``):
    the shape and dtype asked for, an ordinary tensor outside inference mode even when the prototype was
    first needed inside it (a later in-place update must work), NaN when poisoning. The traced path (the
    registered ops' bodies) keeps torch.empty, which fake tensors (torch.compile) can follow."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fastmvit.kernels import _common

    monkeypatch.setattr(_common, "_PROTOTYPES", {})
    device = torch.device(DEVICE)
    with torch.inference_mode():
        first = _common.empty_output((2, 3), torch.float16, device, False, traced=False)
    assert first.is_inference()
    for dtype, shape in ((torch.float32, (5,)), (torch.float16, (1, 4, 4, 8)), (torch.float32, (3, 2))):
        out = _common.empty_output(shape, dtype, device, False, traced=False)
        assert (out.shape, out.dtype, out.device) == (shape, dtype, device) and not out.is_inference()
        out.fill_(0)
    assert _common.empty_output((4,), torch.float16, device, True, traced=False).isnan().all()
    with FakeTensorMode():
        fake = _common.empty_output((6, 7), torch.float16, device, False, traced=True)
    assert fake.shape == (6, 7) and fake.dtype == torch.float16
