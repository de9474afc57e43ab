"""The fused engine end to end: every variant through the Triton kernels (interpreted on the CPU, compiled
on a GPU) against the plain PyTorch path on the same weights, plus the engine's bookkeeping."""
import pytest
import torch

import fastmvit
from fastmvit.variants import VARIANTS

from .kernels.common import DEVICE, ON_GPU
from .utils import assert_matches_torch_path, image_sensitive_, randomize_, varied_images

SIZE = 256 if ON_GPU else 64   # the sizes: 64x64 under the interpreter, 256x256 on a GPU
HALF = [torch.float16] + ([torch.bfloat16] if ON_GPU else [])
# Half precision on every variant on a GPU, where each variant's shapes pick their own tiles. Under the
# interpreter the tiles ignore the dtype, so the other variants' half-precision runs repeat the code
# paths of these: v1 at its narrowest (xxs) and widest (s), v2 with one tile along N everywhere (0.5) and
# with several along N and K (2.0: the 1025-wide qkv, 1024-deep GEMMs). float32 runs every variant.
HALF_VARIANTS = list(VARIANTS) if ON_GPU else ["xxs", "s", "v2-0.5", "v2-2.0"]


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request):
    """A variant with random weights whose logits depend on the image: the torch path and the same weights
    on the engine."""
    name = request.param
    ref = image_sensitive_(fastmvit.load(name, pretrained=False, backend="torch"), size=SIZE, seed=len(name))
    fused = fastmvit.load(name, weights=ref.state_dict(), backend="triton", device=DEVICE)
    return ref.to(DEVICE), fused


# Every comparison with the torch path uses tests.utils.assert_matches_torch_path: the engine's error
# against the float64 torch path may be FACTOR x the torch path's own error in the same dtype plus a few
# ulps of the largest logit, and the images of the batch must differ by SEPARATION x that bound, so an
# output taken from the wrong row or mixed with another image's fails.

def test_float32_logits_match_the_torch_path(pair):
    ref, fused = pair
    x = varied_images((2, 3, SIZE, SIZE)).to(DEVICE)
    with torch.inference_mode():
        got = fused(x)
    assert got.dtype == torch.float32 and got.shape == (2, 1000)
    assert_matches_torch_path(got, ref, x, ref.variant.name)


@pytest.mark.parametrize("pair", HALF_VARIANTS, indirect=True)
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_half_precision_logits_match_the_torch_path(pair, dtype):
    ref, _ = pair
    x = varied_images((2, 3, SIZE, SIZE)).to(DEVICE)
    half = fastmvit.load(ref.variant.name, weights=ref.state_dict(), backend="triton", device=DEVICE, dtype=dtype)
    with torch.inference_mode():
        got = half(x.to(dtype))
    assert got.dtype == dtype
    assert_matches_torch_path(got, ref, x, f"{ref.variant.name} {dtype}")


@pytest.mark.parametrize("name,size,numerics", [
    ("xxs", (96, 80), "cvnets"),       # v1: 6x5 / 3x3 maps -> resize around the transformer
    ("v2-0.5", (96, 80), "cvnets"),    # v2: odd block inputs enlarged and kept (align_corners=True)
    ("v2-0.5", (96, 80), "hf"),        # v2: HF drops the odd row/column and folds zeros back
    ("xs", (64, 96), "hf"),            # HF's post-scaled attention: same kernel, within float rounding
])
def test_odd_maps_and_numerics(name, size, numerics):
    ref = image_sensitive_(fastmvit.load(name, pretrained=False, backend="torch", numerics=numerics),
                           size=size[0], seed=2).to(DEVICE)
    fused = fastmvit.load(name, weights=ref.state_dict(), backend="triton", numerics=numerics, device=DEVICE)
    x = varied_images((2, 3, *size)).to(DEVICE)
    with torch.inference_mode():
        got = fused(x)
    assert_matches_torch_path(got, ref, x, f"{name} {size} {numerics}")


@pytest.mark.parametrize("name", ["xxs", "v2-0.5"])
def test_batch_rows_follow_their_images(name):
    """Permuting the batch permutes the logits: each row is computed from its own image only (an engine
    that mixed up rows, or let one image's attention read another's tokens, fails). Odd map sizes, so
    the resize paths' per-image offsets are exercised too."""
    ref = image_sensitive_(fastmvit.load(name, pretrained=False, backend="torch"), size=80, seed=12).to(DEVICE)
    fused = fastmvit.load(name, weights=ref.state_dict(), backend="triton", device=DEVICE)
    x = varied_images((3, 3, 80, 48), seed=5).to(DEVICE)
    perm = torch.tensor([2, 0, 1])
    with torch.inference_mode():
        out, out_perm = fused(x), fused(x[perm])
    assert_matches_torch_path(out, ref, x, name)            # also: the three images are far apart
    assert_matches_torch_path(out_perm, ref, x[perm], f"{name} permuted")


def test_headless_model_returns_pooled_features():
    ref = image_sensitive_(fastmvit.load("xxs", pretrained=False, backend="torch", num_classes=0), seed=3).to(DEVICE)
    fused = fastmvit.load("xxs", weights=ref.state_dict(), num_classes=0, backend="triton", device=DEVICE)
    x = varied_images((2, 3, 64, 64)).to(DEVICE)
    with torch.inference_mode():
        got = fused(x)
    assert got.shape == (2, 320)
    assert_matches_torch_path(got, ref, x, "headless xxs")


def test_engine_is_rebuilt_when_weights_or_dtype_change():
    model = randomize_(fastmvit.load("xxs", pretrained=False, backend="triton", device=DEVICE), seed=4)
    x = varied_images((1, 3, 64, 64)).to(DEVICE)
    with torch.inference_mode():
        first = model(x)
        other = randomize_(fastmvit.load("xxs", pretrained=False), seed=5).state_dict()
        model.load_state_dict(other)               # new weights: the packed ones must not be reused
        model.backend = "torch"
        expected = model(x)
        model.backend = "triton"
        second = model(x)
        torch.testing.assert_close(second, expected, rtol=0, atol=1e-3)
        assert (second - first).abs().max() > 1e-2
        model.half()                                # a cast rebuilds for the new dtype
        assert model(x.half()).dtype == torch.float16


def test_backends():
    model = fastmvit.load("xxs", pretrained=False)
    assert model.backend == "auto" and "backend='auto'" in repr(model).splitlines()[0] + repr(model)
    with pytest.raises(ValueError, match="backend must be one of"):
        model.backend = "cuda"
    with pytest.raises(ValueError, match="backend must be one of"):
        fastmvit.load("xxs", pretrained=False, backend="tensorrt")


def test_auto_backend_keeps_cpu_tensors_on_the_torch_path(monkeypatch):
    model = fastmvit.load("xxs", pretrained=False)
    monkeypatch.setattr(type(model._engines), "runner", lambda *a: pytest.fail("engine used on the CPU"))
    with torch.inference_mode():
        assert model(varied_images((1, 3, 64, 64))).shape == (1, 1000)


def test_gradients_are_refused_on_the_engine_path():
    model = fastmvit.load("xxs", pretrained=False, backend="triton", device=DEVICE)
    with pytest.raises(RuntimeError, match="inference-only.*backend='torch'"):
        model(varied_images((1, 3, 64, 64)).to(DEVICE).requires_grad_())
    model.requires_grad_(True)
    with pytest.raises(RuntimeError, match="inference-only"):
        model(varied_images((1, 3, 64, 64)).to(DEVICE))


def test_bad_input_is_checked_before_the_engine():
    model = fastmvit.load("xxs", pretrained=False, backend="triton", device=DEVICE)
    with pytest.raises(fastmvit.InputError, match="3 colour channels"):
        model(torch.rand(1, 4, 64, 64, device=DEVICE))


def test_copies_start_without_an_engine():
    import copy

    model = fastmvit.load("xxs", pretrained=False, backend="triton", device=DEVICE)
    with torch.inference_mode():
        model(varied_images((1, 3, 64, 64)).to(DEVICE))
    clone = copy.deepcopy(model)
    assert len(clone._engines._runners) == 0 and len(model._engines._runners) == 1


def test_depthwise_choice(monkeypatch):
    from fastmvit.engine.plan import depthwise_impl
    from fastmvit.ops import cuda_ext

    assert depthwise_impl() == "triton"
    monkeypatch.setenv("FASTMVIT_DWCONV", "cudnn")
    with pytest.raises(ValueError, match="'triton' or 'cuda'"):
        depthwise_impl()
    monkeypatch.setenv("FASTMVIT_DWCONV", "cuda")
    if not cuda_ext.available():
        with pytest.raises(RuntimeError, match="the CUDA extension is not built"):
            depthwise_impl()
    else:
        assert depthwise_impl() == "cuda"


def test_info_names_a_backend_for_every_op():
    from fastmvit.info import collect_info

    backends = collect_info()["op backends"]
    assert "fastmvit::patch_attention" in backends["v1 unfold + attention + fold"]
    assert "fastmvit::dwconv3x3" in backends["depthwise 3x3 + BN + SiLU"]
    assert "fastmvit::bilinear_argmax" in backends["segmentation label maps (DeepLabV3.labels)"]


def test_torch_compile_of_the_interpreted_engine_is_refused():
    if ON_GPU:
        pytest.skip("on a GPU the engine compiles (test_torch_compile_matches_the_engine)")
    model = fastmvit.load("xxs", pretrained=False, backend="triton")
    with torch.inference_mode(), pytest.raises(Exception, match="needs CUDA tensors|cannot be traced by torch.compile"):
        torch.compile(model)(varied_images((1, 3, 64, 64)))


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")
def test_torch_compile_matches_the_engine():
    model = randomize_(fastmvit.load("s", pretrained=False, device="cuda", dtype=torch.float16), seed=6)
    x = varied_images((4, 3, 256, 256)).cuda().half()
    with torch.inference_mode():
        model.cuda_graphs = False
        expected = model(x)                      # also builds the engine before tracing
        got = torch.compile(model, fullgraph=True)(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-3)


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")
def test_cuda_graph_replays_match_across_shapes_and_threads():
    import threading

    ref = randomize_(fastmvit.load("xxs", pretrained=False, device="cuda"), seed=7)
    graphed = fastmvit.load("xxs", weights=ref.state_dict(), device="cuda")
    ref.cuda_graphs = False
    shapes = [(1, 3, 256, 256), (4, 3, 256, 256), (1, 3, 224, 160), (1, 3, 256, 256)]
    errors = []

    def worker(seed):
        g = torch.Generator(device="cuda").manual_seed(seed)
        with torch.inference_mode():
            for i in range(12):
                x = torch.rand(shapes[(seed + i) % len(shapes)], device="cuda", generator=g)
                if (graphed(x) - ref(x)).abs().max().item() > 1e-4:
                    errors.append((seed, i))

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    runner = graphed._engines._runners[(torch.device("cuda", torch.cuda.current_device()), torch.float32)]
    assert runner.captures == 3  # one graph per distinct input shape
