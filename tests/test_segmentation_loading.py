"""Loading segmentation checkpoints: names, auto-detection, files, hub resolution up to the network,
preprocessing and class names, and the errors for what does not fit."""
import json
from pathlib import Path

import pytest
import torch

import fastmvit
from fastmvit import CheckpointError, OptionError, WeightsNotFoundError
from fastmvit.masks import VOC_CLASSES
from fastmvit.model.segmentation import DeepLabV3
from fastmvit.segmentation import HF_SEGMENTATION_PREPROCESS
from fastmvit.variants import VARIANTS

from .utils import hf_segmentation_model, images, randomize_

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def xxs_seg(tmp_path_factory):
    """A random HF DeepLabV3-xxs at output stride 8 with its own class names, saved with save_pretrained."""
    labels = {i: f"class{i}" for i in range(5)}
    hf = randomize_(hf_segmentation_model(VARIANTS["xxs"], output_stride=8, num_labels=5, id2label=labels,
                                          label2id={v: k for k, v in labels.items()}), seed=5)
    path = tmp_path_factory.mktemp("xxs-seg")
    hf.save_pretrained(path)
    return hf, path


def _same_logits(hf, model, shape=(1, 3, 64, 96)):
    x = images(shape)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), hf(x).logits, rtol=0, atol=1e-4)


def test_detected_from_the_checkpoint_under_the_backbone_name(xxs_seg):
    hf, path = xxs_seg
    model = fastmvit.load("xxs", weights=path)  # a classifier name, a segmentation checkpoint
    assert isinstance(model, DeepLabV3)
    cfg = model.pretrained_cfg
    assert (model.num_classes, model.output_stride, cfg["task"]) == (5, 8, "segmentation")
    assert cfg["labels"] == [f"class{i}" for i in range(5)]  # the checkpoint's id2label
    _same_logits(hf, model)


def test_weight_file_and_state_dict(xxs_seg):
    """The safetensors file alone (its config.json beside it gives the output stride) and a bare state dict
    (no config: output stride from the argument)."""
    hf, path = xxs_seg
    _same_logits(hf, fastmvit.load("deeplabv3-xxs", weights=path / "model.safetensors"))
    _same_logits(hf, fastmvit.load("deeplabv3-xxs", weights=hf.state_dict(), output_stride=8))
    default = fastmvit.load("deeplabv3-xxs", weights=hf.state_dict())
    assert default.output_stride == 16  # Apple's checkpoints' stride when nothing says otherwise


def test_hub_names_resolve_to_their_variant(xxs_seg):
    _, path = xxs_seg
    model = fastmvit.load("apple/deeplabv3-mobilevit-xx-small", weights=path)
    assert model.variant.name == "xxs"
    assert fastmvit.load("deeplabv3-mobilevit_xxs", pretrained=False).variant.name == "xxs"
    assert fastmvit.load("apple/mobilevitv2-1.5-voc-deeplabv3", pretrained=False).variant.name == "v2-1.5"


def test_random_weights_have_apples_head():
    model = fastmvit.load("deeplabv3-s", pretrained=False)
    assert (model.num_classes, model.output_stride, model.config.atrous_rates) == (21, 16, (6, 12, 18))
    assert model.head.aspp.project.conv.out_channels == 256
    assert fastmvit.load("deeplabv3-v2-0.5", pretrained=False).head.aspp.project.conv.out_channels == 512
    assert model.pretrained_cfg["labels"] == list(VOC_CLASSES) and len(VOC_CLASSES) == 21
    assert model.pretrained_cfg["preprocess"] == HF_SEGMENTATION_PREPROCESS
    out = model(images((1, 3, 64, 64)))
    assert out.shape == (1, 21, 4, 4)


def test_hf_preprocessor_config_is_read(xxs_seg, tmp_path):
    _, path = xxs_seg
    folder = tmp_path / "with-processor"
    folder.mkdir()
    for f in ("config.json", "model.safetensors"):
        (folder / f).write_bytes((path / f).read_bytes())
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"crop_size": 384, "do_flip_channel_order": False, "resample": 3, "size": 400}))
    cfg = fastmvit.load("deeplabv3-xxs", weights=folder).pretrained_cfg["preprocess"]
    assert (cfg.input_size, cfg.resize, cfg.interpolation, cfg.channel_order) == (384, 400, "bicubic", "RGB")


def test_pretrained_stops_at_the_network_with_instructions():
    with pytest.raises(WeightsNotFoundError, match="apple/deeplabv3-mobilevit-small.*weights=DIR"):
        fastmvit.load("deeplabv3-s")
    with pytest.raises(WeightsNotFoundError, match="no published DeepLabV3 checkpoint for 'v2-0.5'"):
        fastmvit.load("deeplabv3-v2-0.5")


def test_pretrained_downloads_when_online(monkeypatch):
    """Online, the hub repository is fetched with huggingface_hub (stopped here at the network boundary)."""
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        raise ConnectionError("no network in tests")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    with pytest.raises(WeightsNotFoundError, match="ConnectionError: no network in tests"):
        fastmvit.load("apple/mobilevitv2-1.0-voc-deeplabv3")
    ((repo, kwargs),) = calls
    assert repo == "apple/mobilevitv2-1.0-voc-deeplabv3" and kwargs["local_files_only"] is False
    assert {"config.json", "model.safetensors", "pytorch_model.bin"} <= set(kwargs["allow_patterns"])


def test_pretrained_found_in_the_hugging_face_cache(xxs_seg):
    """A hub download already in the HF cache (conftest points the cache at an empty folder) is used offline."""
    import huggingface_hub.constants as hfc

    hf, path = xxs_seg
    repo = Path(hfc.HF_HUB_CACHE) / "models--apple--deeplabv3-mobilevit-xx-small"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    for name in ("config.json", "model.safetensors"):
        (snapshot / name).write_bytes((path / name).read_bytes())
    model = fastmvit.load("apple/deeplabv3-mobilevit-xx-small")
    assert model.pretrained_cfg["repo"] == "apple/deeplabv3-mobilevit-xx-small"
    _same_logits(hf, model)


def test_errors_name_what_is_wrong(xxs_seg):
    hf, path = xxs_seg
    with pytest.raises(CheckpointError, match="DeepLabV3 on 'xxs'.*'s' was requested"):
        fastmvit.load("deeplabv3-s", weights=path)
    with pytest.raises(CheckpointError, match="MobileViT DeepLabV3 in Hugging Face layout, but 'v2-1.0'"):
        fastmvit.load("v2-1.0", weights=path)
    with pytest.raises(CheckpointError, match="5-class segmentation head but num_classes=21"):
        fastmvit.load("deeplabv3-xxs", weights=path, num_classes=21)
    classifier = randomize_(fastmvit.load("xxs", pretrained=False)).state_dict()
    with pytest.raises(CheckpointError, match="no segmentation head"):
        fastmvit.load("deeplabv3-xxs", weights=classifier)
    broken = {k: v for k, v in hf.state_dict().items() if "aspp.convs.2" not in k}
    with pytest.raises(CheckpointError, match=r"missing: segmentation_head\.aspp\.convs\.2\.convolution\.weight"):
        fastmvit.load("deeplabv3-xxs", weights=broken)
    extra = {**hf.state_dict(), "segmentation_head.extra.weight": torch.zeros(3)}
    with pytest.raises(CheckpointError, match=r"unexpected: segmentation_head\.extra\.weight"):
        fastmvit.load("deeplabv3-xxs", weights=extra)
    with pytest.raises(OptionError, match="unknown segmentation model 'deeplabv3-xxl'.*deeplabv3-xxs"):
        fastmvit.load("deeplabv3-xxl", pretrained=False)
    with pytest.raises(OptionError, match="output_stride must be one of"):
        fastmvit.load("deeplabv3-xxs", pretrained=False, output_stride=4)
    with pytest.raises(OptionError, match="output_stride apply to segmentation models only"):
        fastmvit.load("xxs", pretrained=False, output_stride=8)


# --------------------------------------------------------------------------------------------------
# ml-cvnets layout (keys from ml-cvnets' encoder_decoder + deeplabv3; design notes, mobilevit.md 8.3)

# Keys spelled out by hand from ml-cvnets' module names, independent of fastmvit's key tables.
CVNETS_KEYS = {
    "xxs": ["encoder.conv_1.block.conv.weight", "encoder.layer_2.0.block.exp_1x1.block.norm.running_mean",
            "encoder.layer_3.1.local_rep.conv_3x3.block.conv.weight",
            "encoder.layer_3.1.global_rep.0.pre_norm_mha.1.qkv_proj.weight",
            "encoder.layer_5.1.global_rep.3.weight", "encoder.layer_5.1.fusion.block.norm.bias"],
    "v2-0.5": ["encoder.layer_3.1.local_rep.0.block.conv.weight",
               "encoder.layer_4.1.global_rep.2.pre_norm_attn.1.qkv_proj.block.conv.bias",
               "encoder.layer_5.1.conv_proj.block.norm.running_var"],
}
CVNETS_HEAD_KEYS = [
    "seg_head.aspp.aspp_layer.convs.0.block.conv.weight", "seg_head.aspp.aspp_layer.convs.3.block.norm.weight",
    "seg_head.aspp.aspp_layer.convs.4.aspp_pool.conv_1x1.block.conv.weight",
    "seg_head.aspp.aspp_layer.convs.4.aspp_pool.conv_1x1.block.norm.running_var",
    "seg_head.aspp.aspp_layer.project.block.conv.weight", "seg_head.classifier.block.conv.weight",
    "seg_head.classifier.block.conv.bias",
]


@pytest.mark.parametrize("name", ["xxs", "v2-0.5"])
def test_cvnets_layout_end_to_end(name, tmp_path):
    """HF weights renamed to ml-cvnets' keys (+ the training-only aux head, in a training checkpoint's
    container, saved with torch.save) give HF's logits under HF arithmetic; the checkpoint's shapes alone
    pick the variant, and ml-cvnets' yaml defaults the output stride."""
    from fastmvit.weights.segmentation import segmentation_from_canonical

    hf = randomize_(hf_segmentation_model(VARIANTS[name], output_stride=8 if name == "xxs" else 16), seed=9)
    canonical = fastmvit.load(f"deeplabv3-{name}", weights=hf.state_dict()).state_dict()
    cv = segmentation_from_canonical(canonical, name, "cvnets")
    assert set(CVNETS_KEYS[name] + CVNETS_HEAD_KEYS) <= set(cv)
    assert not any(k.startswith(("encoder.conv_1x1_exp", "encoder.classifier")) for k in cv)
    cv["seg_head.aux_head.0.block.conv.weight"] = torch.zeros(128, 64, 3, 3)
    path = tmp_path / "deeplabv3.pt"
    torch.save({"model_state_dict": cv, "epoch": 3}, path)

    model = fastmvit.load("xxs" if name == "xxs" else "v2-0.5", weights=path, numerics="hf",
                          atrous_rates=(6, 12, 18))
    assert model.pretrained_cfg["source_format"] == "cvnets" and model.variant.name == name
    assert model.output_stride == (8 if name == "xxs" else 16)  # ml-cvnets' VOC yamls: v1 OS8, v2 OS16
    assert model.pretrained_cfg["upsample_align_corners"] is True
    _same_logits(hf, model, (1, 3, 96, 96))
    default = fastmvit.load(f"deeplabv3-{name}", weights=path)
    assert default.numerics == fastmvit.model.NUMERICS_PRESETS["cvnets"]
    assert default.config.atrous_rates == ((12, 24, 36) if name == "xxs" else (6, 12, 18))


def test_own_state_dict_round_trip(xxs_seg, tmp_path):
    """``torch.save(model.state_dict())`` of a loaded DeepLabV3 loads back (fastmvit's own keys)."""
    hf, path = xxs_seg
    model = fastmvit.load("deeplabv3-xxs", weights=path)
    torch.save(model.state_dict(), tmp_path / "seg.pth")
    again = fastmvit.load("xxs", weights=tmp_path / "seg.pth", output_stride=8, numerics="hf")
    assert again.pretrained_cfg["source_format"] == "fastmvit" and again.num_classes == 5
    _same_logits(hf, again)


def test_cpu_engine_request_runs_the_torch_path_and_says_so():
    """The CPU engine exports classifiers only: backend="onnxruntime" runs the reference modules, with one
    warning (backend="triton" runs the fused engine: tests/test_segmentation_engine.py)."""
    model = randomize_(fastmvit.load("deeplabv3-xxs", pretrained=False), seed=3)
    model.backend = "onnxruntime"
    x = images((1, 3, 64, 64))
    with pytest.warns(UserWarning, match="plain PyTorch modules"):
        out = model(x)
    model.backend = "torch"
    torch.testing.assert_close(out, model(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="backend must be one of"):
        model.backend = "tensorrt"
