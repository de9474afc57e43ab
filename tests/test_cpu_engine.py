"""The CPU engine (fastmvit.cpu): the model exported to ONNX and run by ONNX Runtime or OpenVINO, against the
plain PyTorch path on the same weights (every variant, odd sizes, batches 1 to 4, every numerics preset)
and against Hugging Face's implementation; its cache, its errors, and what happens without a runtime."""
import json
import warnings

import pytest
import torch

import fastmvit
from fastmvit import cpu
from fastmvit.cpu import export as cpu_export
from fastmvit.variants import VARIANTS

from .utils import hf_model, image_sensitive_, images, randomize_

INSTALLED = [r for r in cpu.AUTO_ORDER[torch.float32] if not cpu.problem(r)]  # auto's float32 candidates
# What choose_engine("auto") answers for float32 CPU tensors: the one runtime, or "measure them" (cpu-auto).
AUTO = cpu.AUTO if len(INSTALLED) > 1 else INSTALLED[0] if INSTALLED else None
pytestmark = pytest.mark.skipif(not INSTALLED, reason="no CPU runtime installed (pip install 'fastmvit[cpu]')")

# One input size per variant, cycling through sizes whose stage maps are odd (v1 resizes around the
# transformer, v2 enlarges or, with HF numerics, crops), even, square and not, including a 2x2-patch stage
# (64x64), the shape at which OpenVINO computes a static-shape graph wrongly.
SIZES = [(64, 64), (97, 65), (96, 80), (33, 47), (64, 96), (71, 71), (64, 64), (97, 65), (96, 80), (40, 72)]


def _close(got, expected):
    """The issue's bound: within 1e-4 of the largest logit, float32."""
    assert got.shape == expected.shape and got.dtype == expected.dtype
    err = (got - expected).abs().max().item() / expected.abs().max().item()
    assert err <= 1e-4, f"max |diff| is {err:.2e} of the largest logit"


@pytest.fixture(autouse=True)
def _auto_runs_the_cpu_engine(monkeypatch):
    monkeypatch.delenv(cpu.runtimes.ENV, raising=False)  # tests/conftest.py turns it off for other tests


# Every variant on the first runtime "auto" measures; the other runtime on one v1 and one v2 variant (CI
# stays short), v1 at 64x64, where OpenVINO's static builds get the packed attention wrong
# (fastmvit.cpu.export).
CASES = [(n, size, INSTALLED[0]) for n, size in zip(VARIANTS, SIZES)] + [
    (n, size, r) for r in INSTALLED[1:] for n, size in (("xs", SIZES[0]), ("v2-1.0", SIZES[5]))]


@pytest.mark.parametrize("name,size,runtime", CASES, ids=[f"{n}-{h}x{w}-{r}" for n, (h, w), r in CASES])
def test_every_variant_matches_the_torch_path_at_every_batch(name, size, runtime):
    # Weights whose logits depend on the image, so a row mixed up within a batch would show.
    ref = image_sensitive_(fastmvit.load(name, pretrained=False, backend="torch"), seed=len(name))
    engine = fastmvit.load(name, weights=ref.state_dict(), backend=runtime)
    with torch.inference_mode():
        for batch in (1, 2, 3, 4):  # one build serves them all
            x = images((batch, 3, *size), seed=batch)
            _close(engine(x), ref(x))
    assert engine._engines.cpu(runtime).signatures() == [(*size, torch.float32, ref.numerics, torch.get_num_threads())]
    assert not any(m.training for m in engine.modules())  # exporting left every BatchNorm in eval mode


@pytest.mark.parametrize("runtime", INSTALLED)
@pytest.mark.parametrize("name,preset", [("xs", "hf"), ("xs", "mmpretrain"), ("v2-0.75", "hf"),
                                         ("v2-0.75", "mmpretrain")])
def test_numerics_presets_at_odd_sizes(name, preset, runtime):
    """Each preset changes the exported graph (attention scaling, SiLU form, v2's odd-size convention);
    "cvnets" (= "timm") is the default of every other test here."""
    ref = randomize_(fastmvit.load(name, pretrained=False, backend="torch", numerics=preset), seed=3)
    engine = fastmvit.load(name, weights=ref.state_dict(), backend=runtime, numerics=preset)
    x = images((2, 3, 97, 81))
    with torch.inference_mode():
        _close(engine(x), ref(x))


def test_switching_numerics_rebuilds_rather_than_reusing_the_old_graph():
    """v2's odd-size convention changes the logits at 97x81: a graph cached for one preset must not answer
    for the other."""
    model = randomize_(fastmvit.load("v2-0.5", pretrained=False), seed=4)
    ref = fastmvit.load("v2-0.5", weights=model.state_dict(), backend="torch")
    x = images((1, 3, 97, 81))
    with torch.inference_mode():
        first = model(x)
        model.set_numerics(fastmvit.Numerics(v2_odd_size="hf"))
        ref.set_numerics(fastmvit.Numerics(v2_odd_size="hf"))
        _close(model(x), ref(x))
    assert (model(x) - first).abs().max() > 1e-3  # the two conventions really differ here


@pytest.mark.parametrize("name", ["xxs", "v2-1.0"])
def test_hf_checkpoint_matches_hf_on_the_cpu_engine(name, tmp_path):
    """A save_pretrained folder, loaded with backend="auto": HF's numerics exported and run by the runtime,
    against transformers itself, at an odd size."""
    pytest.importorskip("transformers")
    variant = VARIANTS[name]
    hf = randomize_(hf_model(variant), seed=9)
    hf.save_pretrained(tmp_path)
    model = fastmvit.load(name, weights=tmp_path)
    x = images((3, 3, 96, 160))
    with torch.inference_mode():
        from fastmvit.engine import choose_engine

        assert choose_engine(model.backend, x) == AUTO
        _close(model(x), hf(x).logits)


@pytest.mark.filterwarnings("ignore")  # the tracer's notes on the reference export
@pytest.mark.parametrize("name,layer", [("xs", "MatMul"), ("v2-0.5", "Conv")])
def test_packed_qkv_projections_are_exported_as_three_layers_and_the_model_left_alone(name, layer, tmp_path,
                                                                                      monkeypatch):
    """graph_form: v1's packed q|k|v linear and v2's packed conv become three layers each (no Split left:
    v1's packed form is what OpenVINO's snippets get wrong, v2's split its reference kernel), in a copy; the
    caller's model keeps its modules and weights. Parity is the tests above."""
    onnx = pytest.importorskip("onnx")
    from fastmvit.model.blocks import Attention, SeparableAttention

    def ops(path):
        return [n.op_type for n in onnx.load(str(path)).graph.node]

    monkeypatch.setenv("FASTMVIT_CACHE", str(tmp_path))
    model = randomize_(fastmvit.load(name, pretrained=False, backend="torch"), seed=22)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    attentions = sum(isinstance(m, (Attention, SeparableAttention)) for m in model.modules())
    exported = ops(cpu_export.exported_onnx(model, cpu_export.weights_fingerprint(model), (64, 64)))
    with torch.no_grad():  # the packed form, as the torch path traces: one Split per attention
        torch.onnx.export(cpu_export._ReferenceForward(model), (torch.zeros(1, 3, 64, 64),),
                          str(tmp_path / "p.onnx"), dynamo=False, opset_version=cpu_export.OPSET)
    packed = ops(tmp_path / "p.onnx")
    assert attentions == 2 + 4 + 3  # the transformer depths of every variant
    assert packed.count("Split") == attentions and "Split" not in exported
    assert exported.count(layer) == packed.count(layer) + 2 * attentions
    assert sum(isinstance(m, (Attention, SeparableAttention)) for m in model.modules()) == attentions
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


def test_headless_model_returns_pooled_features():
    ref = randomize_(fastmvit.load("xxs", pretrained=False, num_classes=0, backend="torch"), seed=5)
    engine = fastmvit.load("xxs", weights=ref.state_dict(), num_classes=0)
    x = images((2, 3, 64, 64))
    with torch.inference_mode():
        _close(engine(x), ref(x))


def test_new_weights_and_new_sizes_rebuild_and_the_cache_stays_bounded(monkeypatch):
    monkeypatch.setattr(cpu.engine, "MAX_SIGNATURES", 2)
    model = randomize_(fastmvit.load("xxs", pretrained=False), seed=6)
    x = images((1, 3, 64, 64))
    with torch.inference_mode():
        before = model(x)
        model.load_state_dict(randomize_(fastmvit.load("xxs", pretrained=False), seed=7).state_dict())
        after = model(x)
        ref = fastmvit.load("xxs", weights=model.state_dict(), backend="torch")
        _close(after, ref(x))
        assert (after - before).abs().max() > 1e-2
        for size in ((64, 96), (96, 64), (64, 64)):
            model(images((1, 3, *size)))
    engine = model._engines.cpu(AUTO)
    assert [s[:2] for s in engine.signatures()] == [(96, 64), (64, 64)]


def test_the_exported_graph_is_kept_on_disk_for_the_next_process(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTMVIT_CACHE", str(tmp_path))
    # One runtime, so both models compute the same bits: under "auto" a busy machine's measurement stays
    # provisional and the second model may measure and keep the other runtime (fastmvit.cpu.pick).
    monkeypatch.setenv(cpu.runtimes.ENV, INSTALLED[0])
    weights = randomize_(fastmvit.load("xxs", pretrained=False), seed=8).state_dict()
    x = images((1, 3, 64, 64))
    with torch.inference_mode():
        expected = fastmvit.load("xxs", weights=weights)(x)
    files = list((tmp_path / "cpu").glob("*.onnx"))
    assert len(files) == 1

    def no_export(*args, **kwargs):
        raise AssertionError("exported again although the graph is on disk")

    monkeypatch.setattr(torch.onnx, "export", no_export)
    with torch.inference_mode():
        torch.testing.assert_close(fastmvit.load("xxs", weights=weights)(x), expected, rtol=0, atol=0)
        # Other weights are another graph: exported, not mistaken for the cached one.
        other = randomize_(fastmvit.load("xxs", pretrained=False), seed=9)
        with pytest.raises(AssertionError, match="exported again"):
            fastmvit.load("xxs", weights=other.state_dict())(x)


def test_disk_cache_is_pruned(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTMVIT_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_export, "MAX_FILES_ON_DISK", 2)
    model = randomize_(fastmvit.load("xxs", pretrained=False), seed=10)
    with torch.inference_mode():
        for size in ((32, 32), (32, 64), (64, 32)):
            model(images((1, 3, *size)))
    assert sorted(p.name.split("-")[1] for p in (tmp_path / "cpu").glob("*.onnx")) == ["32x64", "64x32"]


@pytest.fixture(scope="module")
def xxs_engine():
    return fastmvit.load("xxs", pretrained=False, backend=INSTALLED[0])


@pytest.mark.parametrize("bad,match", [
    (torch.rand(3, 64, 64), "4 dims"),
    (torch.rand(1, 64, 64, 3), "channels-last"),
    ((images((1, 3, 64, 64)) * 255).to(torch.uint8), "floating-point"),
    (images((0, 3, 64, 64)), "empty batch"),
    (images((1, 3, 31, 64)), "too small"),
    (images((1, 3, 64, 64)).double(), "does not match the model"),
    ([[0.0]], "torch.Tensor"),
])
def test_bad_input_gets_the_torch_paths_errors(xxs_engine, bad, match):
    torch_path = fastmvit.load("xxs", pretrained=False, backend="torch")
    for model in (xxs_engine, torch_path):
        with pytest.raises(fastmvit.InputError, match=match):
            model(bad)


def test_gradients_are_refused_with_a_pointer_to_the_torch_path(xxs_engine):
    x = images((1, 3, 64, 64)).requires_grad_()
    with pytest.raises(RuntimeError, match="inference-only.*backend='torch'"):
        xxs_engine(x)


def test_a_missing_runtime_is_said_clearly(monkeypatch):
    """Explicitly asked for: a clear error at load(). Under "auto": a warning, and the torch path runs."""
    monkeypatch.setattr(cpu.runtimes.importlib.util, "find_spec", lambda name, *a: None)
    cpu.runtimes.problem.cache_clear()
    cpu.runtimes._auto_runtimes.cache_clear()
    try:
        with pytest.raises(RuntimeError, match=r"onnxruntime is not installed: install it with .*fastmvit\[cpu\]"):
            fastmvit.load("xxs", pretrained=False, backend="onnxruntime")
        model = randomize_(fastmvit.load("xxs", pretrained=False), seed=12)
        ref = fastmvit.load("xxs", weights=model.state_dict(), backend="torch")
        x = images((1, 3, 64, 64))
        with pytest.warns(RuntimeWarning, match=r"no CPU runtime is installed .*plain PyTorch modules"):
            out = model(x)
        torch.testing.assert_close(out, ref(x), rtol=0, atol=0)  # the torch path itself
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            model(x)  # said once, not at every call
    finally:
        cpu.runtimes.problem.cache_clear()
        cpu.runtimes._auto_runtimes.cache_clear()


def test_dtypes_without_a_cpu_runtime_run_the_torch_path():
    """float64 (and bfloat16 on CPUs without bf16 instructions) is computed by the torch path under "auto";
    asked explicitly, the runtime says what it cannot do."""
    ref = randomize_(fastmvit.load("xxs", pretrained=False, backend="torch"), seed=13).double()
    auto = fastmvit.load("xxs", weights=ref.state_dict(), dtype=torch.float64)
    x = images((1, 3, 64, 64)).double()
    with torch.inference_mode():
        torch.testing.assert_close(auto(x), ref(x), rtol=0, atol=0)
        explicit = fastmvit.load("xxs", weights=ref.state_dict(), dtype=torch.float64, backend=INSTALLED[0])
        with pytest.raises(RuntimeError, match="cannot compute in torch.float64"):
            explicit(x)


def test_env_switch_chooses_the_torch_path(monkeypatch):
    from fastmvit.engine import TORCH, choose_engine

    x = images((1, 3, 64, 64))
    assert choose_engine("auto", x) == AUTO
    monkeypatch.setenv(cpu.runtimes.ENV, "torch")
    assert choose_engine("auto", x) == TORCH
    for unset in ("", "  "):
        monkeypatch.setenv(cpu.runtimes.ENV, unset)
        assert choose_engine("auto", x) == AUTO
    monkeypatch.setenv(cpu.runtimes.ENV, "tensorrt")
    with pytest.raises(fastmvit.errors.OptionError, match="FASTMVIT_CPU_ENGINE='tensorrt'.*'openvino'"):
        choose_engine("auto", x)


def _built(model, runtime):
    """The runtime's own objects (ONNX Runtime sessions, OpenVINO compiled models) the model's CPU engine
    built, per signature."""
    engine = model._engines.cpu(runtime)
    return {key: compiled.built for key, compiled in engine._built.items()}


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _built_at_one_and_two_threads(runtime, seed):
    """``_built`` of an xxs model on ``runtime`` called once under 1 torch thread and once under 2."""
    model = randomize_(fastmvit.load("xxs", pretrained=False, backend=runtime), seed=seed)
    x = images((1, 3, 64, 64))
    with torch.inference_mode():
        for threads in (1, 2):
            torch.set_num_threads(threads)
            model(x)
    return _built(model, runtime)


@pytest.mark.skipif("onnxruntime" not in INSTALLED, reason="ONNX Runtime not installed")
def test_onnxruntime_sessions_do_not_spin_and_take_torchs_thread_count(restore_threads):
    """The options are checked on the very sessions the engine built: threads that spin after each run
    take a core from whatever runs next, and a thread count other than torch's oversubscribes the CPU."""
    sessions = _built_at_one_and_two_threads("onnxruntime", seed=15)
    assert [key[-1] for key in sessions] == [1, 2]  # the thread count is part of the build key
    for (*_, threads), session in sessions.items():
        options = session.get_session_options()
        assert options.intra_op_num_threads == threads
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
        assert options.get_session_config_entry("session.inter_op.allow_spinning") == "0"


@pytest.mark.skipif("openvino" not in INSTALLED, reason="OpenVINO not installed")
def test_openvino_takes_torchs_thread_count(restore_threads):
    compiled = _built_at_one_and_two_threads("openvino", seed=16)
    assert [key[-1] for key in compiled] == [1, 2]
    for (*_, threads), builds in compiled.items():
        assert list(builds) == [1]  # batch 1's static build
        assert int(builds[1].get_property("INFERENCE_NUM_THREADS")) == threads


@pytest.mark.skipif("openvino" not in INSTALLED, reason="OpenVINO not installed")
def test_openvino_builds_the_first_batch_sizes_static_and_the_rest_dynamic(monkeypatch):
    """The first MAX_STATIC_BATCHES batch sizes each get a static build, later ones share one dynamic-batch
    build. Every batch against the torch path, at xs 64x64: where static builds of the packed attention
    are wrong (OpenVINO's snippets: 5e-2 of the largest logit on these weights)."""
    monkeypatch.setattr(cpu.RUNTIMES["openvino"], "MAX_STATIC_BATCHES", 2)
    ref = image_sensitive_(fastmvit.load("xs", pretrained=False, backend="torch"), seed=17)
    model = fastmvit.load("xs", weights=ref.state_dict(), backend="openvino")
    with torch.inference_mode():
        for batch in (3, 1, 4, 3, 2, 1):
            x = images((batch, 3, 64, 64), seed=batch)
            _close(model(x), ref(x))
    (builds,) = _built(model, "openvino").values()
    assert list(builds) == [3, 1, None]
    assert builds[3].inputs[0].partial_shape.to_shape()[0] == 3
    assert builds[None].inputs[0].partial_shape[0].is_dynamic


@pytest.mark.parametrize("runtime", INSTALLED)
def test_concurrent_callers_each_get_their_own_images_logits(monkeypatch, runtime):
    """A server calls one model from several threads: each call's logits are its own images', while builds
    (OpenVINO: two static batch sizes, then the dynamic build) happen under the callers' feet."""
    import concurrent.futures

    monkeypatch.setattr(cpu.RUNTIMES["openvino"], "MAX_STATIC_BATCHES", 2)
    ref = image_sensitive_(fastmvit.load("xxs", pretrained=False, backend="torch"), seed=23)
    model = fastmvit.load("xxs", weights=ref.state_dict(), backend=runtime)
    jobs = [images((1 + i % 4, 3, 64, 64), seed=100 + i) for i in range(16)]
    with torch.inference_mode():
        expected = [ref(x) for x in jobs]

        def call(i):
            return model(jobs[i])

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            results = list(pool.map(call, range(len(jobs))))
    for got, want in zip(results, expected):
        _close(got, want)
    if runtime == "openvino":
        (builds,) = _built(model, "openvino").values()
        assert len(builds) == 3 and None in builds  # two static batch sizes, the others on the dynamic build


def test_auto_runs_the_measured_runtime_per_dtype(monkeypatch):
    """float32: ONNX Runtime and OpenVINO, measured (CPU_AUTO) when both are installed; bfloat16: OpenVINO
    only, where the CPU has bf16; float16 and float64: the torch path. FASTMVIT_CPU_ENGINE forces one."""
    from fastmvit.engine import TORCH, choose_engine

    assert cpu.AUTO_ORDER[torch.float32] == ("onnxruntime", "openvino")
    assert cpu.AUTO_ORDER[torch.bfloat16] == ("openvino",)
    assert choose_engine("auto", images((1, 3, 64, 64))) == AUTO
    for dtype in (torch.float16, torch.float64):
        assert choose_engine("auto", images((1, 3, 64, 64)).to(dtype)) == TORCH
    if len(INSTALLED) > 1:
        monkeypatch.setenv(cpu.runtimes.ENV, INSTALLED[1])
        assert choose_engine("auto", images((1, 3, 64, 64))) == INSTALLED[1]


# --------------------------------------------------------------------------------------------------
# backend="auto" with several runtimes: the faster measured once per signature, the choice kept on disk
# --------------------------------------------------------------------------------------------------

two_runtimes = pytest.mark.skipif(len(INSTALLED) < 2, reason="needs ONNX Runtime and OpenVINO")


def _fake_timing(monkeypatch, median_ms=None):
    """Replace the measurement: answer ``median_ms`` (after checking that every candidate really computes),
    or fail the test when anything is timed (median_ms None). Returns the calls: [{runtime: weakref}]."""
    import weakref

    calls = []

    def time_runtimes(compiled, x):
        if median_ms is None:
            raise AssertionError(f"timed {sorted(compiled)} although nothing should be measured")
        assert sorted(compiled) == sorted(median_ms) and x.shape[0] == cpu.pick.PROBE_BATCH
        for run in compiled.values():
            assert run(x).shape == (x.shape[0], 1000)
        calls.append({name: weakref.ref(run) for name, run in compiled.items()})
        return dict(median_ms)

    monkeypatch.setattr(cpu.pick, "time_runtimes", time_runtimes)
    return calls


@two_runtimes
@pytest.mark.parametrize("faster", ["onnxruntime", "openvino"])
def test_auto_keeps_the_runtime_measured_faster_and_drops_the_other(monkeypatch, faster):
    import gc

    slower = next(r for r in INSTALLED if r != faster)
    calls = _fake_timing(monkeypatch, {faster: 1.0, slower: 2.0})
    model = randomize_(fastmvit.load("xxs", pretrained=False), seed=17)
    ref = fastmvit.load("xxs", weights=model.state_dict(), backend="torch")
    with torch.inference_mode():
        for batch in (1, 3):  # one measurement per signature, whatever the batch
            x = images((batch, 3, 64, 64), seed=batch)
            _close(model(x), ref(x))
    assert len(calls) == 1
    key = (64, 64, torch.float32, torch.get_num_threads())
    assert model.cpu_engine_runtimes == {key: faster}
    assert "cpu_engine[64x64 float32 " in repr(model) and f"={faster!r}" in repr(model)
    built = _built(model, cpu.AUTO)
    assert len(built) == 1
    (kept,) = built.values()
    if isinstance(kept, dict):  # OpenVINO: {batch size: compiled model}
        kept = next(iter(kept.values()))
    assert type(kept).__module__.startswith(faster)  # the faster runtime's own object
    gc.collect()
    assert calls[0][slower]() is None and calls[0][faster]() is not None  # the slower graph was dropped


@two_runtimes
def test_the_choice_is_recorded_on_disk_and_not_measured_again(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTMVIT_CACHE", str(tmp_path))
    weights = randomize_(fastmvit.load("xxs", pretrained=False), seed=18).state_dict()
    x = images((2, 3, 64, 64))
    # The runtime listed second wins, so a build that skipped the record and took the first would show.
    calls = _fake_timing(monkeypatch, {INSTALLED[1]: 1.0, INSTALLED[0]: 2.0})
    monkeypatch.setattr(cpu.pick, "machine_load", lambda: 0.1)  # quiet: the measurement settles the choice
    model = fastmvit.load("xxs", weights=weights)
    with torch.inference_mode():
        expected = model(x)
    assert len(calls) == 1
    records = list((tmp_path / "cpu").glob("*.pick.json"))
    assert len(records) == 1 and f'"runtime": "{INSTALLED[1]}"' in records[0].read_text()

    _fake_timing(monkeypatch, None)  # from here on, timing fails the test
    key = (64, 64, torch.float32, torch.get_num_threads())
    model.invalidate_engine()  # the in-memory engines gone: built again from the disk record
    again = fastmvit.load("xxs", weights=weights)  # as a new process would
    with torch.inference_mode():
        for m in (model, again):
            torch.testing.assert_close(m(x), expected, rtol=0, atol=0)
            assert m.cpu_engine_runtimes == {key: INSTALLED[1]}
        # Another size is another graph: measured, not answered by this record.
        with pytest.raises(AssertionError, match="timed"):
            again(images((1, 3, 64, 96)))
        # A record made on another CPU model (a cache directory shared between machines) is measured again.
        monkeypatch.setattr(cpu.pick, "cpu_name", lambda: "another CPU")
        with pytest.raises(AssertionError, match="timed"):
            fastmvit.load("xxs", weights=weights)(x)


@two_runtimes
def test_a_busy_or_close_measurement_is_provisional_and_measured_again(monkeypatch, tmp_path):
    """Busy (load injected) or a margin under MIN_MARGIN: the next engine built for the graph (here a new
    model, as in a new process) measures again, until a quiet, clear measurement settles the choice or
    MAX_MEASUREMENTS were made; meanwhile the choice is the lowest geometric mean of each runtime's median
    over the fastest (not simply the latest measurement)."""
    monkeypatch.setenv("FASTMVIT_CACHE", str(tmp_path))
    weights = randomize_(fastmvit.load("xxs", pretrained=False), seed=21).state_dict()
    x = images((1, 3, 64, 64))
    a, b = INSTALLED
    key = (64, 64, torch.float32, torch.get_num_threads())
    busy = max(1.0, cpu.pick.BUSY_LOAD_PER_CPU * cpu.runtimes.cpu_count())

    def new_process(median_ms, load):
        """A first build as a fresh process makes it (timing fails the test when median_ms is None)."""
        calls = _fake_timing(monkeypatch, median_ms)
        monkeypatch.setattr(cpu.pick, "machine_load", lambda: load)
        model = fastmvit.load("xxs", weights=weights)
        with torch.inference_mode():
            model(x)
        (record_file,) = (tmp_path / "cpu").glob("*.pick.json")
        return model.cpu_engine_runtimes[key], json.loads(record_file.read_text()), len(calls)

    # Busy, clear winner a: provisional. Then busy, b 5% faster: a still leads (geometric means 1.02 vs 1.41).
    runtime, record, timed = new_process({a: 10.0, b: 20.0}, busy + 0.5)
    assert (runtime, record["settled"], timed) == (a, False, 1)
    runtime, record, timed = new_process({a: 10.5, b: 10.0}, busy + 0.5)
    assert (runtime, record["settled"], timed) == (a, False, 1) and len(record["measurements"]) == 2
    # Quiet, but b wins by under MIN_MARGIN: not decisive; the third measurement settles it anyway.
    close = 1 + cpu.pick.MIN_MARGIN / 2
    runtime, record, timed = new_process({a: 10.0 * close, b: 10.0}, 0.1)
    assert record["settled"] and len(record["measurements"]) == cpu.pick.MAX_MEASUREMENTS == 3
    assert runtime == record["runtime"] == a  # geometric means (1.0 * 1.05 * 1.025)^(1/3) vs 2^(1/3)
    assert new_process(None, busy + 5)[0] == a  # settled: never timed again, however busy

    # A quiet, clear measurement settles at once, with its own winner over earlier provisional ones.
    for path in (tmp_path / "cpu").glob("*.pick.json"):
        path.unlink()
    assert new_process({a: 10.0, b: 30.0}, busy)[1]["settled"] is False  # at the limit is busy
    runtime, record, _ = new_process({a: 10.0, b: 10.0 / (1 + 2 * cpu.pick.MIN_MARGIN)}, busy - 0.01)
    assert (runtime, record["settled"]) == (b, True)
    assert new_process(None, 0.1)[0] == b


@two_runtimes
def test_forced_runtimes_are_never_measured(monkeypatch):
    _fake_timing(monkeypatch, None)
    weights = randomize_(fastmvit.load("xxs", pretrained=False), seed=19).state_dict()
    x = images((1, 3, 64, 64))
    key = (64, 64, torch.float32, torch.get_num_threads())
    with torch.inference_mode():
        for runtime in INSTALLED:
            model = fastmvit.load("xxs", weights=weights, backend=runtime)
            model(x)
            assert model.cpu_engine_runtimes == {key: runtime}
            monkeypatch.setenv(cpu.runtimes.ENV, runtime)
            model = fastmvit.load("xxs", weights=weights)  # "auto", forced by the environment
            model(x)
            assert model.cpu_engine_runtimes == {key: runtime}
            monkeypatch.delenv(cpu.runtimes.ENV)


def test_one_runtime_installed_is_not_measured(monkeypatch):
    from fastmvit.engine import choose_engine

    find_spec = cpu.runtimes.importlib.util.find_spec
    monkeypatch.setattr(cpu.runtimes.importlib.util, "find_spec",
                        lambda name, *a: None if name in INSTALLED[1:] else find_spec(name, *a))
    cpu.runtimes.problem.cache_clear()
    cpu.runtimes._auto_runtimes.cache_clear()
    try:
        _fake_timing(monkeypatch, None)
        model = randomize_(fastmvit.load("xxs", pretrained=False), seed=20)
        x = images((1, 3, 64, 64))
        assert choose_engine("auto", x) == INSTALLED[0]
        with torch.inference_mode():
            model(x)
        assert model.cpu_engine_runtimes == {(64, 64, torch.float32, torch.get_num_threads()): INSTALLED[0]}
    finally:
        cpu.runtimes.problem.cache_clear()
        cpu.runtimes._auto_runtimes.cache_clear()


def test_the_measurement_times_every_candidate_interleaved():
    """The real timing function: WARMUP + RUNS runs of each candidate, alternating, a median per runtime."""
    order = []

    def runner(name):
        return lambda x: order.append(name)

    ms = cpu.pick.time_runtimes({"a": runner("a"), "b": runner("b")}, cpu.pick.probe(32, 32))
    assert sorted(ms) == ["a", "b"] and all(v >= 0 for v in ms.values())
    w = 2 * cpu.pick.WARMUP
    assert order[:w] == ["a", "b"] * cpu.pick.WARMUP
    assert order[w:w + 4] == ["a", "b", "b", "a"] and len(order) == 2 * (cpu.pick.WARMUP + cpu.pick.RUNS)


def test_info_says_what_auto_runs_per_dtype_and_whether_the_cpu_has_bf16():
    from fastmvit.info import collect_info, format_info

    info = collect_info()
    summary = info["CPU engine (backend='auto' on CPU tensors)"]
    assert summary["float32"].startswith(f"CPU engine on {' or '.join(INSTALLED)}")
    assert ("faster measured" in summary["float32"]) == (len(INSTALLED) > 1)
    assert summary["float64"] == "torch path"
    bf16 = "openvino" in INSTALLED and torch.bfloat16 in cpu.RUNTIMES["openvino"].supported_dtypes()
    assert summary["bfloat16"] == ("CPU engine on openvino" if bf16 else "torch path")
    flags = cpu.runtimes.cpu_bf16_flags()
    assert summary["bfloat16 on this CPU"].startswith("unknown" if flags is None else "yes" if flags else "no")
    assert "bfloat16 on this CPU" in format_info(info)


def test_bf16_flags_are_read_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f amx_tile avx512_bf16 amx_bf16\n")
    assert cpu.runtimes.cpu_bf16_flags(str(cpuinfo)) == ("amx_bf16", "avx512_bf16")
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f avx512bw\n")
    assert cpu.runtimes.cpu_bf16_flags(str(cpuinfo)) == ()
    assert cpu.runtimes.cpu_bf16_flags(str(tmp_path / "absent")) is None
    if "openvino" in INSTALLED and cpu.runtimes.cpu_bf16_flags() is not None:
        # this CPU, read two ways: the flags and OpenVINO's own capability list
        assert bool(cpu.runtimes.cpu_bf16_flags()) == ("BF16" in cpu.RUNTIMES["openvino"].cpu_capabilities())


@pytest.mark.skipif("openvino" not in INSTALLED, reason="OpenVINO not installed")
def test_bfloat16_where_the_cpu_has_it():
    """bfloat16 runs on OpenVINO's bf16 precision where the CPU has bf16 instructions; elsewhere "auto"
    leaves it to the torch path. Either way the answer points the same way as float32."""
    ov = cpu.RUNTIMES["openvino"]
    ref = randomize_(fastmvit.load("xxs", pretrained=False, backend="torch"), seed=14)
    model = fastmvit.load("xxs", weights=ref.state_dict(), dtype=torch.bfloat16)
    x = images((2, 3, 64, 64))
    from fastmvit.engine import TORCH, choose_engine

    has_bf16 = torch.bfloat16 in ov.supported_dtypes()
    assert choose_engine("auto", x.bfloat16()) == ("openvino" if has_bf16 else TORCH)
    with torch.inference_mode():
        got = model(x.bfloat16())
        expected = ref(x)
    assert got.dtype == torch.bfloat16
    assert torch.nn.functional.cosine_similarity(got.float(), expected, dim=1).min() > 0.99


# --------------------------------------------------------------------------------------------------
# The benchmark's CPU rows: the peers (ONNX Runtime, OpenVINO on the same weights) and the CPU engine
# --------------------------------------------------------------------------------------------------

def test_benchmark_peers_and_cpu_engine_rows_compute_the_torch_paths_logits():
    from fastmvit.benchmark import engines as E

    cpu_device = torch.device("cpu")
    # 160x160, not 64x64: the OpenVINO peer runs a static-shape graph, which OpenVINO 2026.4 computes
    # wrongly when a stage has 2x2 patches (64x64, 128x128); the benchmark's error column shows that.
    ref = E.ENGINES["torch-eager"].build("xxs", 2, "float32", cpu_device, 160).fn()
    rows = [n for n in ("onnxruntime", "openvino") if n in INSTALLED]
    rows += [f"fastmvit-{n}" for n in rows]
    for name in rows:
        with torch.inference_mode():
            _close(E.ENGINES[name].build("xxs", 2, "float32", cpu_device, 160).fn(), ref)
    kind, what = E.ENGINES["fastmvit"].runs_on(cpu_device, "float32")
    assert kind == "CPU engine" and E.PEERS[INSTALLED[0]] in what
    assert E.ENGINES["fastmvit"].runs_on(cpu_device, "float16")[0] == "torch path"
    assert not E.ENGINES["fastmvit"].computes_reference(cpu_device)


@pytest.mark.skipif("onnxruntime" not in INSTALLED, reason="ONNX Runtime not installed")
def test_benchmark_onnxruntime_peer_does_not_spin_into_the_next_row():
    from fastmvit.benchmark import engines as E

    run = E._onnxruntime_fn(E.exported_onnx("xxs", 1, 64))
    assert run.session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_benchmark_peers_say_why_they_cannot_run(monkeypatch):
    from fastmvit.benchmark import engines as E

    cpu_device = torch.device("cpu")
    with pytest.raises(E.Unavailable, match="runs on the CPU"):
        E.ENGINES["onnxruntime"].check(torch.device("cuda"), "float16")
    if "onnxruntime" in INSTALLED:
        with pytest.raises(E.Unavailable, match="no float16/bfloat16"):
            E.ENGINES["onnxruntime"].check(cpu_device, "bfloat16")
    monkeypatch.setattr(E, "_import_problem", lambda m: f"{m} is not importable (test)")
    with pytest.raises(E.Unavailable, match=r"openvino is not importable .*fastmvit\[cpu\]"):
        E.ENGINES["openvino"].check(cpu_device, "float32")
