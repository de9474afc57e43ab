"""The Triton model repository, checked without a server: config.pbtxt parsed by Triton's own protobuf
schema (from tritonclient), for the CPU configuration the real-server tests run and the GPU one they
cannot (KIND_GPU, float16 inside, inputs left on the device)."""

import pytest

from fastmvit.serving import cli
from fastmvit.serving.common import InputLimits, default_batch_sizes
from fastmvit.serving.triton import config_pbtxt, write_model_repository

from .helpers import INPUT_SIZE, MODEL

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2",
                                       reason="tritonclient[grpc] (the serve extra) parses config.pbtxt")
text_format = pytest.importorskip("google.protobuf.text_format")


def parse(path):
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def params(config):
    return {k: v.string_value for k, v in config.parameters.items()}


def test_cpu_repository(tmp_path, checkpoint):
    model_dir = write_model_repository(tmp_path, MODEL, checkpoint, kind="cpu", instances=2, max_batch_size=8,
                                       max_queue_delay_us=5000, top_k=3, input_size=INPUT_SIZE,
                                       limits=InputLimits(max_bytes=1234), copy_weights=True)
    c = parse(model_dir / "config.pbtxt")
    assert (c.name, c.backend, c.max_batch_size) == ("fastmvit", "python", 8)
    assert list(c.dynamic_batching.preferred_batch_size) == [2, 4, 8]
    assert c.dynamic_batching.max_queue_delay_microseconds == 5000
    assert [(i.name, i.data_type, list(i.dims), i.optional) for i in c.input] == [
        ("image", model_config_pb2.TYPE_FP32, [3, INPUT_SIZE, INPUT_SIZE], True),
        ("image_bytes", model_config_pb2.TYPE_STRING, [1], True)]
    assert [(o.name, o.data_type, list(o.dims)) for o in c.output] == [
        ("logits", model_config_pb2.TYPE_FP32, [1000]), ("topk_indices", model_config_pb2.TYPE_INT64, [3]),
        ("topk_scores", model_config_pb2.TYPE_FP32, [3]), ("topk_labels", model_config_pb2.TYPE_STRING, [3])]
    assert c.output[0].label_filename == "labels.txt"
    assert [(g.kind, g.count) for g in c.instance_group] == [(model_config_pb2.ModelInstanceGroup.KIND_CPU, 2)]
    p = params(c)
    assert p["fastmvit_model"] == "xxs" and p["fastmvit_dtype"] == "float32"
    assert p["fastmvit_weights"] == "weights/xxs.safetensors" and p["fastmvit_max_image_bytes"] == "1234"
    assert p["fastmvit_input_size"] == str(INPUT_SIZE) and p["fastmvit_top_k"] == "3"
    assert "FORCE_CPU_ONLY_INPUT_TENSORS" not in p
    assert (model_dir / "1" / "weights" / "xxs.safetensors").read_bytes() == open(checkpoint, "rb").read()
    labels = (model_dir / "labels.txt").read_text().splitlines()
    assert len(labels) == 1000 and labels[0] == "tench, Tinca tinca"
    assert "from fastmvit.serving.triton_model import TritonPythonModel" in (model_dir / "1" / "model.py").read_text()


def test_gpu_repository(tmp_path, checkpoint):
    model_dir = write_model_repository(tmp_path, MODEL, checkpoint, kind="gpu", gpus=[0, 1], max_batch_size=32,
                                       name="mvit")
    c = parse(model_dir / "config.pbtxt")
    g = c.instance_group[0]
    assert (g.kind, g.count, list(g.gpus)) == (model_config_pb2.ModelInstanceGroup.KIND_GPU, 1, [0, 1])
    # preferred sizes = the sizes warmed up (and captured as CUDA graphs), less 1
    assert list(c.dynamic_batching.preferred_batch_size) == list(default_batch_sizes(32)[1:]) == [2, 4, 8, 16, 32]
    p = params(c)
    assert p["fastmvit_dtype"] == "float16" and p["FORCE_CPU_ONLY_INPUT_TENSORS"] == "no"
    assert p["fastmvit_weights"] == str(checkpoint)  # referenced, not copied
    assert list(c.input[0].dims) == [3, 256, 256]  # the checkpoint's own size
    assert c.input[0].data_type == c.output[0].data_type == model_config_pb2.TYPE_FP32  # float32 on the wire


def test_config_custom_batch_sizes_and_errors():
    text = config_pbtxt(name="m", image_size=64, num_classes=10, top_k=2, kind="cpu", max_batch_size=12,
                        batch_sizes=[1, 6, 12], parameters={"a": "b"})
    c = text_format.Parse(text, model_config_pb2.ModelConfig())
    assert list(c.dynamic_batching.preferred_batch_size) == [6, 12] and params(c) == {"a": "b"}
    with pytest.raises(ValueError):
        config_pbtxt(name="m", image_size=64, num_classes=10, top_k=2, kind="tpu")
    with pytest.raises(ValueError):
        config_pbtxt(name="m", image_size=64, num_classes=10, top_k=2, kind="cpu", max_batch_size=4, batch_sizes=[8])


def test_writer_refuses_bad_settings(tmp_path, checkpoint):
    for kw in [{"kind": "tpu"}, {"dtype": "int8"}, {"top_k": 1001}, {"top_k": 0}]:
        with pytest.raises(ValueError):
            write_model_repository(tmp_path, MODEL, checkpoint, **kw)


def test_command_line(tmp_path, checkpoint, capsys):
    assert cli.main(["triton", str(tmp_path / "repo"), "--model", MODEL, "--weights", checkpoint, "--device", "cpu",
                     "--max-batch-size", "4", "--top-k", "2", "--input-size", "96"]) == 0
    assert "tritonserver --model-repository" in capsys.readouterr().out
    c = parse(tmp_path / "repo" / "fastmvit" / "config.pbtxt")
    assert c.max_batch_size == 4 and list(c.input[0].dims) == [3, 96, 96] and list(c.output[1].dims) == [2]
    assert cli.main(["triton", str(tmp_path / "r2"), "--model", MODEL, "--weights", checkpoint, "--top-k", "0"]) == 2
    assert "top_k" in capsys.readouterr().err


def test_serve_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert info.value.code == 0
    for option in ("--model", "--weights", "--max-batch-size", "--batch-timeout-ms", "--max-body-bytes", "--port"):
        assert option in out


def test_segmentation_repository_from_the_command_line(tmp_path, capsys):
    """`serve triton --model deeplabv3-xxs --random`: images of any size in, one mask PNG per image out,
    the PASCAL VOC class names in labels.txt."""
    assert cli.main(["triton", str(tmp_path / "repo"), "--model", "deeplabv3-xxs", "--random", "--device", "cpu",
                     "--max-batch-size", "4", "--input-size", "96"]) == 0
    c = parse(tmp_path / "repo" / "fastmvit" / "config.pbtxt")
    assert [(i.name, i.data_type, list(i.dims), i.optional) for i in c.input] == [
        ("image", model_config_pb2.TYPE_FP32, [3, -1, -1], True),
        ("image_bytes", model_config_pb2.TYPE_STRING, [1], True)]
    assert [(o.name, o.data_type, list(o.dims), o.label_filename) for o in c.output] == [
        ("mask_png", model_config_pb2.TYPE_STRING, [1], "labels.txt")]
    p = params(c)
    assert (p["fastmvit_model"], p["fastmvit_task"], p["fastmvit_pretrained"]) == ("deeplabv3-xxs", "segmentation",
                                                                                   "false")
    assert p["fastmvit_input_size"] == "96"
    from fastmvit.masks import VOC_CLASSES

    assert (tmp_path / "repo" / "fastmvit" / "labels.txt").read_text().splitlines() == list(VOC_CLASSES)
    with pytest.raises(ValueError, match="task"):
        config_pbtxt(name="m", image_size=64, num_classes=10, top_k=2, kind="cpu", task="detection")
