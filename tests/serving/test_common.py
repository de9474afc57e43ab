"""The pieces both servers share, without a server: request checks and their status codes, and the
model wrapper (float32 on the wire, padding to warmed batch sizes, warm-up of every size)."""
import io

import numpy as np
import pytest
import torch

import fastmvit
from fastmvit.serving import common
from fastmvit.serving.common import (Classifier, ImageDecoder, InputLimits, RequestError, default_batch_sizes,
                                     resolve_dtype, scaled_preprocess)

from .helpers import INPUT_SIZE, MODEL, SECRET, bad_images, preprocessed

LIMITS = InputLimits(max_bytes=300_000)  # above a [3, 128, 128] float32 .npy
EXPECTED_STATUS = {"not_an_image": 415, "truncated_jpeg": 400, "one_pixel": 422, "bomb": 413,
                   "over_pixel_limit": 413, "over_large_body": 413, "empty": 400}


@pytest.fixture(scope="module")
def model(checkpoint):
    return fastmvit.load(MODEL, checkpoint)


@pytest.fixture(scope="module")
def decoder(model):
    return ImageDecoder(scaled_preprocess(model.pretrained_cfg["preprocess"], INPUT_SIZE), LIMITS)


@pytest.fixture(scope="module")
def npy_decoder(decoder):
    return ImageDecoder(decoder.cfg)  # default limits: room for a float64 image


def npy(array) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def test_decode_matches_in_process_preprocess(decoder, images, checkpoint):
    got = np.stack([decoder.decode(data) for data in images.values()])
    assert got.dtype == np.float32 and got.shape == (len(images), 3, INPUT_SIZE, INPUT_SIZE)
    assert torch.equal(torch.from_numpy(got), preprocessed(checkpoint, list(images.values())))


@pytest.mark.parametrize("name", sorted(EXPECTED_STATUS))
def test_bad_image_status_and_message(decoder, name):
    data, mentions = bad_images(LIMITS.max_bytes)[name]
    with pytest.raises(RequestError) as info:
        decoder.decode(data)
    assert info.value.status == EXPECTED_STATUS[name]
    assert mentions in info.value.message
    assert SECRET.decode() not in info.value.message and len(info.value.message) <= 300


def test_messages_are_printable_and_bounded():
    assert common._clean("a\x00b\nc" + "x" * 500) == "a?b?c" + "x" * 292 + "..."


def test_npy_image(npy_decoder):
    x = np.random.default_rng(0).random((3, INPUT_SIZE, INPUT_SIZE), dtype=np.float32)
    assert np.array_equal(npy_decoder.read_npy(npy(x)), x)
    assert np.array_equal(npy_decoder.read_npy(npy(x[None])), x)  # a batch of one is one image
    assert np.array_equal(npy_decoder.read_npy(npy(np.asfortranarray(x))), x)


@pytest.mark.parametrize("array, status, mentions", [
    (np.zeros((3, 64, 64), np.float32), 422, "shape [3, 128, 128]"),
    (np.zeros((3, INPUT_SIZE, INPUT_SIZE), np.float64), 422, "float32"),
    (np.zeros((INPUT_SIZE, INPUT_SIZE, 3), np.uint8), 422, "float32"),
    (np.zeros((2, 3, INPUT_SIZE, INPUT_SIZE), np.float32), 422, "one image per request"),
    (np.full((3, INPUT_SIZE, INPUT_SIZE), np.nan, np.float32), 422, "NaN"),
], ids=["shape", "float64", "uint8-hwc", "batch-of-2", "nan"])
def test_npy_refused(npy_decoder, array, status, mentions):
    with pytest.raises(RequestError) as info:
        npy_decoder.read_npy(npy(array))
    assert (info.value.status, mentions in info.value.message) == (status, True), info.value.message


def test_npy_malformed(decoder):
    whole = npy(np.zeros((3, INPUT_SIZE, INPUT_SIZE), np.float32))
    for data, status in [(b"\x93NUMPY garbage" + SECRET, 400), (whole[:-10], 400), (b"", 400),
                         (whole + b"\0" * LIMITS.max_bytes, 413)]:
        with pytest.raises(RequestError) as info:
            decoder.read_npy(data)
        assert info.value.status == status and SECRET.decode() not in info.value.message


def test_npy_huge_declared_shape_is_refused_before_allocating(decoder):
    header = npy(np.zeros((3, INPUT_SIZE, INPUT_SIZE), np.float32))[:128]
    with pytest.raises(RequestError) as info:
        decoder.read_npy(header.replace(b"(3, 128, 128)", b"(3, 99999, 9999)", 1))
    assert info.value.status == 422


def test_check_images(decoder):
    x = torch.rand(2, 3, INPUT_SIZE, INPUT_SIZE)
    assert decoder.check_images(x) is x
    for bad in [x.double(), x[:, :2], torch.empty(0, 3, INPUT_SIZE, INPUT_SIZE), x.clone().index_fill_(0, torch.tensor([1]), float("inf"))]:
        with pytest.raises(RequestError) as info:
            decoder.check_images(bad)
        assert info.value.status == 422


def test_batch_sizes_and_scaled_preprocess():
    assert default_batch_sizes(1) == (1,)
    assert default_batch_sizes(8) == (1, 2, 4, 8)
    assert default_batch_sizes(12) == (1, 2, 4, 8, 12)
    cfg = fastmvit.PreprocessConfig(256, 288)
    assert scaled_preprocess(cfg, None) is cfg
    assert scaled_preprocess(cfg, 128) == fastmvit.PreprocessConfig(128, 144)
    with pytest.raises(ValueError):
        scaled_preprocess(cfg, 16)


def test_dtype_policy_float16_inside_on_gpu():
    assert resolve_dtype("auto", torch.device("cuda")) == torch.float16
    assert resolve_dtype(None, torch.device("cpu")) == torch.float32
    assert resolve_dtype("bfloat16", torch.device("cuda")) == torch.bfloat16
    with pytest.raises(ValueError):
        resolve_dtype("int8", torch.device("cpu"))


class Spy(torch.nn.Module):
    """Wraps a model and records the batch size of every forward."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.sizes = model, []
        self.pretrained_cfg, self.num_classes = model.pretrained_cfg, model.num_classes

    def forward(self, x):
        self.sizes.append(x.shape[0])
        return self.inner(x)


def test_forward_pads_to_warmed_sizes_and_chunks(model):
    spy = Spy(model)
    clf = Classifier(spy, batch_sizes=(1, 2, 4), input_size=INPUT_SIZE, pad_batches=True)
    x = torch.rand(7, 3, INPUT_SIZE, INPUT_SIZE, generator=torch.Generator().manual_seed(0))
    got = clf.forward(x[:3])
    assert spy.sizes == [4] and got.shape == (3, 1000) and got.dtype == torch.float32
    with torch.inference_mode():  # exactly the model's rows on the zero-padded batch
        assert torch.equal(got, model(torch.cat([x[:3], torch.zeros_like(x[:1])]))[:3])
    spy.sizes.clear()
    assert clf.forward(x).shape == (7, 1000)  # larger than the largest size: chunks of 4, padded
    assert spy.sizes == [4, 4]


def test_cpu_does_not_pad_by_default(model):
    spy = Spy(model)
    clf = Classifier(spy, batch_sizes=(1, 2, 4), input_size=INPUT_SIZE)
    clf.forward(torch.rand(3, 3, INPUT_SIZE, INPUT_SIZE))
    assert spy.sizes == [3] and not clf.pad_batches


def test_warmup_runs_every_batch_size(model):
    spy = Spy(model)
    clf = Classifier(spy, batch_sizes=(4, 1, 2), input_size=INPUT_SIZE)
    assert clf.warmup() == (1, 2, 4) and spy.sizes == [1, 2, 4] and clf.warmed_up == (1, 2, 4)


def test_warmup_says_what_it_is_doing(model):
    """Each batch size is announced before it runs, and "ready" after the last (serve's log shows them)."""
    spy = Spy(model)
    clf = Classifier(spy, batch_sizes=(1, 2, 4), input_size=INPUT_SIZE)
    said = []
    clf.warmup(progress=lambda m: said.append((m, len(spy.sizes))))
    assert [(m.split(" (")[0], ran) for m, ran in said[:3]] == [
        ("warm-up 1/3: batch 1", 0), ("warm-up 2/3: batch 2", 1), ("warm-up 3/3: batch 4", 2)]
    assert said[3][0].startswith("ready: warm-up of batch sizes 1, 2, 4 took ") and said[3][1] == 3
    assert len(said) == 4


def test_warmup_names_the_cpu_engine_when_it_runs(monkeypatch):
    """On a CPU with a runtime installed, "auto" builds the CPU engine during the warm-up (seconds at the
    first size): the progress lines say so, and say "CPU kernels" where the torch path runs."""
    from fastmvit import cpu

    monkeypatch.delenv(cpu.runtimes.ENV, raising=False)  # tests/conftest.py turns the CPU engine off
    if not cpu.auto_runtimes(torch.float32):
        pytest.skip("no CPU runtime installed")
    clf = Classifier.load(MODEL, pretrained=False, device="cpu", input_size=64, batch_sizes=(1, 2), progress=None)
    said = []
    clf.warmup(progress=said.append)
    assert all("building the CPU engine" in m for m in said[:2]) and clf.model.cpu_engine_runtimes
    monkeypatch.setenv(cpu.runtimes.ENV, "torch")
    said.clear()
    clf.warmup(progress=said.append)
    assert all("choosing the CPU kernels" in m for m in said[:2])


def test_float16_inside_float32_on_the_wire(checkpoint):
    """The GPU policy, run on the CPU: the model computes in float16, callers see float32."""
    clf = Classifier.load(MODEL, checkpoint, device="cpu", dtype="float16", input_size=64)
    assert clf.dtype == torch.float16
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    got = clf.forward(x)
    assert got.dtype == torch.float32 and got.device.type == "cpu"
    # the classifier runs at most max_batch_size images a forward (1 here); float16 results on the CPU may
    # round differently at another batch size, so the reference runs the same batches
    assert clf.max_batch_size == 1
    with torch.inference_mode():
        assert torch.equal(got, torch.cat([clf.model(x[i:i + 1].half()).float() for i in range(len(x))]))


def test_load_asks_for_the_fused_engine_and_cuda_graphs(monkeypatch, checkpoint):
    seen = {}

    def load(name, weights=None, *, pretrained=True, num_classes=1000, numerics="auto", device=None, dtype=None,
             backend=None, cuda_graphs=None):
        seen.update(backend=backend, cuda_graphs=cuda_graphs, device=device, dtype=dtype)
        return fastmvit.load(name, weights, pretrained=pretrained, num_classes=num_classes, device=device, dtype=dtype)

    monkeypatch.setattr(common, "_load_fn", lambda: load)
    Classifier.load(MODEL, checkpoint, device="cpu")
    assert seen == {"backend": "auto", "cuda_graphs": True, "device": torch.device("cpu"), "dtype": torch.float32}


@pytest.mark.parametrize("accept, png", [
    (None, False), ("", False), ("*/*", False), ("application/json", False), ("text/html", False),
    ("image/png", True), ("image/*", True), ("image/png, application/json", False),
    ("image/png;q=0.5, application/json", False), ("application/json;q=0.1, image/png", True),
    ("application/json;q=0, image/png;q=0.2", True), ("image/png;q=bad, */*;q=0.1", False),
])
def test_segmentation_answers_png_only_when_accept_prefers_it(accept, png):
    litserve = pytest.importorskip("fastmvit.serving.litserve", reason="the serve extra (litserve) is not installed")
    assert litserve.wants_png(accept) is png
