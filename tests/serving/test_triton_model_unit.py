"""TritonPythonModel without a server, through a stand-in for ``triton_python_backend_utils``: what the real
server cannot show on a CPU machine (a KIND_GPU instance loads on its GPU in float16) and what it shows
only indirectly (one forward per execute, whatever the mix of good and bad requests)."""
import json
import sys
import types

import numpy as np
import pytest
import torch

import fastmvit
from fastmvit.serving import common
from fastmvit.serving.triton import write_model_repository

from ..utils import photo
from .helpers import (INPUT_SIZE, MODEL, SEGMENTATION_MODEL, SEGMENTATION_SIZE, assert_mask, bad_images, image_ref, png,
                      preprocessed, reference, reference_logits, write_segmentation_checkpoint)

text_format = pytest.importorskip("google.protobuf.text_format")
json_format = pytest.importorskip("google.protobuf.json_format")
model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")


class FakeTensor:
    def __init__(self, name, array):
        self._name, self._array = name, array

    @classmethod
    def from_dlpack(cls, name, capsule):
        return cls(name, torch.from_dlpack(capsule).numpy())

    def as_numpy(self):
        return self._array

    def to_dlpack(self):
        return torch.utils.dlpack.to_dlpack(torch.from_numpy(self._array))

    def is_cpu(self):
        return True

    def name(self):
        return self._name


class FakeError:
    INVALID_ARG, INTERNAL, UNAVAILABLE = "INVALID_ARG", "INTERNAL", "UNAVAILABLE"

    def __init__(self, message, code):
        self.message, self.code = message, code


class FakeResponse:
    def __init__(self, output_tensors, error=None):
        self.outputs = {t.name(): t.as_numpy() for t in output_tensors}
        self.error = error


def fake_pb_utils():
    m = types.ModuleType("triton_python_backend_utils")
    m.Tensor, m.TritonError, m.InferenceResponse = FakeTensor, FakeError, FakeResponse
    m.get_input_tensor_by_name = lambda request, name: request.get(name)
    return m  # no MetricFamily: metrics are optional


@pytest.fixture
def triton_model(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake_pb_utils())
    monkeypatch.delitem(sys.modules, "fastmvit.serving.triton_model", raising=False)
    import fastmvit.serving.triton_model as tm

    monkeypatch.setattr(tm.np, "__version__", "1.26.4")  # stand for the stub's numpy<2 environment
    return tm


def triton_args(model_dir, kind="CPU", device_id=0):
    """What Triton hands initialize(): the config as JSON with proto field names."""
    config = text_format.Parse((model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    return {"model_config": json.dumps(json_format.MessageToDict(config, preserving_proto_field_name=True)),
            "model_instance_kind": kind, "model_instance_device_id": str(device_id),
            "model_repository": str(model_dir), "model_version": "1", "model_name": config.name}


def test_gpu_instance_loads_on_its_gpu_in_float16(triton_model, tmp_path, checkpoint, monkeypatch):
    model_dir = write_model_repository(tmp_path, MODEL, checkpoint, kind="gpu", max_batch_size=4, input_size=64,
                                       copy_weights=True)
    seen = {}
    real_load = common.Classifier.load.__func__

    def load(cls, model, weights=None, **kw):
        seen.update(kw, model=model, weights=weights)
        kw.update(device="cpu", dtype="float32")  # no GPU here: load on the CPU, after recording the request
        return real_load(cls, model, weights, **kw)

    monkeypatch.setattr(common.Classifier, "load", classmethod(load))
    m = triton_model.TritonPythonModel()
    m.initialize(triton_args(model_dir, "GPU", 1))
    assert seen["device"] == "cuda:1" and seen["dtype"] == "float16"
    assert seen["batch_sizes"] == [1, 2, 4]  # every preferred size, and 1, warmed up
    assert seen["weights"] == str(model_dir / "1" / "weights" / "xxs.safetensors")
    assert m.classifier.warmed_up == (1, 2, 4)


def test_numpy_2_refused_unless_the_config_allows_it(triton_model, tmp_path, checkpoint, monkeypatch):
    model_dir = write_model_repository(tmp_path, MODEL, checkpoint, kind="cpu", max_batch_size=1, input_size=64)
    monkeypatch.setattr(triton_model.np, "__version__", "2.1.0")
    with pytest.raises(RuntimeError, match="numpy<2"):
        triton_model.TritonPythonModel().initialize(triton_args(model_dir))
    config = model_dir / "config.pbtxt"
    config.write_text(config.read_text().replace(
        "parameters [", 'parameters [\n  { key: "fastmvit_stub_numpy2" value: { string_value: "yes" } },'))
    triton_model.TritonPythonModel().initialize(triton_args(model_dir))


def test_execute_runs_good_requests_in_one_forward_and_refuses_bad_ones(triton_model, tmp_path, checkpoint,
                                                                         images):
    model_dir = write_model_repository(tmp_path, MODEL, checkpoint, kind="cpu", max_batch_size=8,
                                       input_size=INPUT_SIZE, top_k=3)
    m = triton_model.TritonPythonModel()
    m.initialize(triton_args(model_dir))
    forwards = []
    inner = m.classifier.forward
    m.classifier.forward = lambda x: forwards.append(x.shape[0]) or inner(x)
    data = list(images.values())
    pixels = preprocessed(checkpoint, data[:2]).numpy()
    bad = bad_images(10**6)
    requests = [
        {"image_bytes": FakeTensor("image_bytes", np.array([[data[2]], [data[3]]], np.object_))},
        {"image_bytes": FakeTensor("image_bytes", np.array([[bad["truncated_jpeg"][0]]], np.object_))},
        {"image": FakeTensor("image", pixels)},
        {"image_bytes": FakeTensor("image_bytes", np.array([[data[4]], [bad["one_pixel"][0]]], np.object_))},
        {},
        {"image": FakeTensor("image", np.full_like(pixels[:1], np.nan))},
    ]
    responses = m.execute(requests)
    assert len(responses) == len(requests) and forwards == [4]  # 2 + 2 images, one forward
    ref = reference_logits(checkpoint, [data[2], data[3], data[0], data[1]])
    for resp, rows in [(responses[0], ref[:2]), (responses[2], ref[2:])]:
        assert resp.error is None
        torch.testing.assert_close(torch.from_numpy(resp.outputs["logits"]), rows, rtol=1e-4,
                                   atol=2e-3 * float(rows.std()))
        assert (resp.outputs["topk_indices"][:, 0] == rows.argmax(-1).numpy()).all()
        assert resp.outputs["topk_labels"].shape == (2, 3) and resp.outputs["topk_labels"].dtype == np.object_
    for i, mentions in [(1, "truncated"), (3, "image 1: image of 1x1"), (4, "exactly one"), (5, "NaN")]:
        assert responses[i].error.code == "INVALID_ARG" and mentions in responses[i].error.message
        assert not responses[i].outputs


def test_execute_answers_each_request_when_the_forward_fails(triton_model, tmp_path, checkpoint, images,
                                                              monkeypatch):
    """Out of memory above 2 images (injected): the batch is split and every request answered (an image that
    never fits: tests/serving/test_faults.py); a device fault answers UNAVAILABLE, and every later request
    at once, without touching the poisoned device again."""
    trigger = tmp_path / "device-error"
    monkeypatch.setenv("FASTMVIT_SERVING_FAULTS", f"oom_above=2,device_error_when={trigger}")
    model_dir = write_model_repository(tmp_path, MODEL, checkpoint, kind="cpu", max_batch_size=8,
                                       input_size=INPUT_SIZE, top_k=3)
    m = triton_model.TritonPythonModel()
    m.initialize(triton_args(model_dir))
    forwards = []
    inner = m.classifier.forward
    m.classifier.forward = lambda x: forwards.append(x.shape[0]) or inner(x)
    data = list(images.values())
    requests = [{"image_bytes": FakeTensor("image_bytes", np.array([[d]], np.object_))} for d in data[:5]]
    responses = m.execute(requests)
    assert forwards == [2, 1, 2]  # 5 -> 3 + 2 -> (2 + 1) + 2: the injected OOM fires before the real forward
    ref = reference_logits(checkpoint, data[:5])
    for resp, row in zip(responses, ref):
        assert resp.error is None
        torch.testing.assert_close(torch.from_numpy(resp.outputs["logits"][0]), row, rtol=1e-4,
                                   atol=2e-3 * float(row.std()))

    trigger.touch()
    forwards.clear()
    responses = m.execute(requests[:2])
    assert [r.error.code for r in responses] == ["UNAVAILABLE"] * 2
    assert all("device error" in r.error.message for r in responses)
    responses = m.execute(requests[:3])
    assert [r.error.code for r in responses] == ["UNAVAILABLE"] * 3 and forwards == []
    assert all("cannot serve any more" in r.error.message for r in responses)


def _segmentation_model(triton_model, tmp_path, record):
    """The Python backend serving a random-weight DeepLabV3 checkpoint on the CPU: (model, checkpoint,
    forwards), where each forward of its classifier appends ``record(x)`` to ``forwards``."""
    checkpoint = write_segmentation_checkpoint(tmp_path / "seg.safetensors")
    model_dir = write_model_repository(tmp_path / "repo", SEGMENTATION_MODEL, checkpoint, kind="cpu",
                                       max_batch_size=8, input_size=SEGMENTATION_SIZE)
    m = triton_model.TritonPythonModel()
    m.initialize(triton_args(model_dir))
    forwards = []
    inner = m.classifier.forward
    m.classifier.forward = lambda x: forwards.append(record(x)) or inner(x)
    return m, checkpoint, forwards


def test_segmentation_groups_equal_shapes_across_requests_and_answers_each_its_masks(triton_model, tmp_path):
    """Five good images in four requests, three input shapes: three forwards; every request gets its masks in
    its own order, each at its image's size, and a bad image fails its request alone."""
    m, checkpoint, forwards = _segmentation_model(triton_model, tmp_path, lambda x: tuple(x.shape))
    pics = {"a": png(photo(97, 131, 1)), "t": png(photo(131, 97, 2)), "big": png(photo(194, 262, 3)),
            "b": png(photo(97, 131, 4))}
    tensor = torch.rand(1, 3, 67, 81, generator=torch.Generator().manual_seed(5))

    def encoded(*items):
        return {"image_bytes": FakeTensor("image_bytes", np.array([[x] for x in items], np.object_))}

    requests = [encoded(pics["a"], pics["t"]), encoded(bad_images(10**6)["one_pixel"][0]), encoded(pics["big"]),
                {"image": FakeTensor("image", tensor.numpy())}, encoded(pics["b"], bad_images(10**6)["bomb"][0]),
                encoded(pics["b"])]
    responses = m.execute(requests)
    # 97x131, 194x262 and the other 97x131 all resize to 64 x 86: one forward of three
    assert sorted(forwards) == [(1, 3, 64, 86), (1, 3, 67, 81), (3, 3, 86, 64)]
    model = fastmvit.load(SEGMENTATION_MODEL, checkpoint)
    for i, names in [(0, ["a", "t"]), (2, ["big"]), (5, ["b"])]:
        assert responses[i].error is None
        masks = responses[i].outputs["mask_png"]
        assert masks.shape == (len(names), 1) and masks.dtype == np.object_
        for name, mask in zip(names, masks[:, 0]):
            assert_mask(mask, image_ref(model, pics[name]))
    assert_mask(responses[3].outputs["mask_png"][0, 0], reference(model, tensor[0], (67, 81)))
    for i, mentions in [(1, "too small"), (4, "image 1: image data: image of")]:
        assert responses[i].error.code == "INVALID_ARG" and mentions in responses[i].error.message, \
            responses[i].error.message
        assert not responses[i].outputs


def test_segmentation_out_of_memory_splits_the_shape_group(triton_model, tmp_path, monkeypatch):
    """Out of memory above 2 images (injected): a forward of three same-shape images is split and retried,
    and each request still gets its own mask."""
    monkeypatch.setenv("FASTMVIT_SERVING_FAULTS", "oom_above=2")
    m, checkpoint, forwards = _segmentation_model(triton_model, tmp_path, lambda x: x.shape[0])
    pics = [png(photo(97, 131, seed)) for seed in (1, 2, 3)]
    responses = m.execute([{"image_bytes": FakeTensor("image_bytes", np.array([[p]], np.object_))} for p in pics])
    assert forwards == [2, 1]  # 3 -> 2 + 1: the injected OOM fires before the real forward
    model = fastmvit.load(SEGMENTATION_MODEL, checkpoint)
    for resp, p in zip(responses, pics):
        assert resp.error is None
        assert_mask(resp.outputs["mask_png"][0, 0], image_ref(model, p))
