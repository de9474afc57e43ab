"""Checkpoint containers and files: every format end to end, and every way a checkpoint can be wrong."""
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

import fastmvit
from fastmvit import CheckpointError
from fastmvit.weights import from_canonical

from .utils import images, randomize_


@pytest.fixture(scope="module")
def xxs():
    """A random xxs model and its state dict in every layout."""
    model = randomize_(fastmvit.load("xxs", pretrained=False), seed=11)
    sd = model.state_dict()
    return model, {fmt: from_canonical(sd, "xxs", fmt) for fmt in ("timm", "hf", "cvnets", "mmpretrain")}


def _same_tensors(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def _same_logits(a, b):
    x = images((2, 3, 64, 64))
    with torch.inference_mode():
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


@pytest.mark.parametrize("fmt,container,filename", [
    ("timm", "plain", "model.safetensors"),
    ("timm", "plain", "mobilevit_xxs.pth"),
    ("timm", "train", "checkpoint.pth.tar"),      # timm train script: {"state_dict", "epoch", ...}
    ("hf", "plain", "pytorch_model.bin"),
    ("hf", "plain", "model.safetensors"),
    ("cvnets", "plain", "mobilevit_xxs.pt"),
    ("cvnets", "ddp", "checkpoint_best.pt"),      # saved from DistributedDataParallel: "module." prefix
    ("mmpretrain", "mmpretrain", "mobilevit-xxsmall_3rdparty_in1k.pth"),
])
def test_every_container_loads(xxs, tmp_path, fmt, container, filename):
    model, layouts = xxs
    sd = layouts[fmt]
    path = tmp_path / filename
    if filename.endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        obj = {"plain": sd, "train": {"state_dict": sd, "epoch": 3, "arch": "mobilevit_xxs"},
               "ddp": {f"module.{k}": v for k, v in sd.items()},
               "mmpretrain": {"meta": {"epoch": 300, "mmcls_version": "0.24"}, "state_dict": sd}}[container]
        torch.save(obj, path)
    loaded = fastmvit.load("xxs", weights=path)
    assert loaded.pretrained_cfg["source_format"] == fmt
    assert loaded.pretrained_cfg["file"] == str(path)
    _same_tensors(loaded, model)


def test_hf_directory_reads_config_labels_and_preprocessing(xxs, tmp_path):
    import json

    model, layouts = xxs
    save_file({k: v.contiguous() for k, v in layouts["hf"].items()}, str(tmp_path / "model.safetensors"))
    labels = {str(i): f"class {i}" for i in range(1000)}
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mobilevit", "id2label": labels}))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"crop_size": {"height": 256, "width": 256}, "do_flip_channel_order": True, "resample": 2,
         "size": {"shortest_edge": 288}}))
    loaded = fastmvit.load("xxs", weights=tmp_path)
    _same_tensors(loaded, model)
    assert loaded.pretrained_cfg["labels"][7] == "class 7"
    pre = loaded.pretrained_cfg["preprocess"]
    assert (pre.resize, pre.input_size, pre.channel_order, pre.interpolation) == (288, 256, "BGR", "bilinear")


@pytest.mark.parametrize("fmt,attention,activation", [
    ("timm", "prescale", "silu"), ("cvnets", "prescale", "silu"), ("hf", "postscale", "silu"),
    ("mmpretrain", "sdpa", "x_sigmoid_x")])
def test_numerics_follow_the_source(xxs, fmt, attention, activation):
    """numerics="auto" computes like the implementation the checkpoint came from (mobilevit.md D1, D2)."""
    model, layouts = xxs
    loaded = fastmvit.load("xxs", weights=layouts[fmt])
    _same_tensors(loaded, model)
    n = loaded.pretrained_cfg["numerics"]
    assert (n.attention, n.activation) == (attention, activation)
    assert loaded.stages[2][1].transformer[0].attn.numerics is n  # propagated to every module
    forced = fastmvit.load("xxs", weights=layouts[fmt], numerics="cvnets")
    _same_logits(forced, model)


def test_missing_num_batches_tracked_is_fine(xxs):
    model, layouts = xxs
    sd = {k: v for k, v in layouts["cvnets"].items() if not k.endswith("num_batches_tracked")}
    _same_logits(fastmvit.load("xxs", weights=sd), model)


# ---- the wrong checkpoint -------------------------------------------------------------------------

def test_other_variant_names_format_and_variant(xxs):
    _, layouts = xxs
    with pytest.raises(CheckpointError, match=r"checkpoint is 'xxs' \(mobilevit_xxs\) in ml-cvnets layout, "
                                              r"but 's' \(mobilevit_s\) was requested"):
        fastmvit.load("s", weights=layouts["cvnets"])


def test_v1_checkpoint_for_a_v2_model(xxs):
    _, layouts = xxs
    with pytest.raises(CheckpointError, match=r"MobileViT checkpoint in Hugging Face layout, but 'v2-1.0'"):
        fastmvit.load("v2-1.0", weights=layouts["hf"])


def test_missing_keys_are_named(xxs):
    _, layouts = xxs
    sd = dict(layouts["timm"])
    del sd["stages.2.1.transformer.1.attn.qkv.weight"]
    with pytest.raises(CheckpointError, match=r"timm layout does not fit 'xxs'.*missing: "
                                              r"stages.2.1.transformer.1.attn.qkv.weight"):
        fastmvit.load("xxs", weights=sd)


def test_unexpected_keys_are_named(xxs):
    _, layouts = xxs
    sd = dict(layouts["mmpretrain"], **{"backbone.extra.weight": torch.zeros(3)})
    with pytest.raises(CheckpointError, match=r"unexpected: backbone.extra.weight"):
        fastmvit.load("xxs", weights=sd)


def test_shape_mismatch_is_named(xxs):
    _, layouts = xxs
    sd = dict(layouts["hf"])
    key = "mobilevit.conv_1x1_exp.convolution.weight"
    sd[key] = torch.zeros(320, 80, 3, 3)
    with pytest.raises(CheckpointError, match=rf"shape mismatch: {key} \(checkpoint \[320, 80, 3, 3\], "
                                              rf"xxs expects \[320, 80, 1, 1\]\)"):
        fastmvit.load("xxs", weights=sd)


def test_unknown_layout():
    with pytest.raises(CheckpointError, match="not a MobileViT checkpoint in any known layout"):
        fastmvit.load("s", weights={"fc.weight": torch.zeros(2, 2)})


def test_head_size_mismatch_suggests_num_classes(xxs):
    model, layouts = xxs
    sd = dict(layouts["timm"], **{"head.fc.weight": torch.zeros(10, 320), "head.fc.bias": torch.zeros(10)})
    with pytest.raises(CheckpointError, match="has a 10-class head but num_classes=1000 was requested; "
                                              "pass num_classes=10"):
        fastmvit.load("xxs", weights=sd)
    assert fastmvit.load("xxs", weights=sd, num_classes=None).num_classes == 10
    assert fastmvit.load("xxs", weights=sd, num_classes=10)(images((1, 3, 64, 64))).shape == (1, 10)


def test_num_classes_zero_gives_pooled_features(xxs):
    model, layouts = xxs
    features = fastmvit.load("xxs", weights=layouts["cvnets"], num_classes=0)
    x = images((2, 3, 64, 64))
    with torch.inference_mode():
        pooled = features(x)
        torch.testing.assert_close(pooled, model.forward_features(x).mean((-2, -1)), rtol=0, atol=0)
    assert pooled.shape == (2, 320)


def test_headless_checkpoint_needs_num_classes_zero(xxs):
    _, layouts = xxs
    sd = {k: v for k, v in layouts["timm"].items() if not k.startswith("head.")}
    with pytest.raises(CheckpointError, match="has no classifier head.*pass num_classes=0"):
        fastmvit.load("xxs", weights=sd)
    assert fastmvit.load("xxs", weights=sd, num_classes=0).num_classes == 0


# ---- files that are not (good) checkpoints --------------------------------------------------------

class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_pickle_that_runs_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {"stem.conv.weight": _RunsCode()}}, f, protocol=2)
    torch.save({"stem.conv.weight": _RunsCode()}, tmp_path / "evil_zip.pth")
    for p in (path, tmp_path / "evil_zip.pth"):
        with pytest.raises(CheckpointError, match="refused to load .*could run arbitrary code"):
            fastmvit.load("s", weights=p)
    assert not (tmp_path / "pwned").exists()


def test_a_jpeg_is_not_a_checkpoint(tmp_path):
    from PIL import Image

    path = tmp_path / "cat.pth"
    Image.new("RGB", (32, 32), "red").save(path, format="JPEG")
    with pytest.raises(CheckpointError, match="is not a checkpoint: it is neither safetensors nor"):
        fastmvit.load("s", weights=path)


@pytest.mark.parametrize("filename", ["model.safetensors", "model.pth"])
def test_truncated_checkpoint(xxs, tmp_path, filename):
    _, layouts = xxs
    path = tmp_path / filename
    if filename.endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in layouts["timm"].items()}, str(path))
    else:
        torch.save(layouts["timm"], path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="damaged .*(truncated or corrupt)"):
        fastmvit.load("xxs", weights=path)


def test_empty_and_missing_files(tmp_path):
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match="only 0 bytes long"):
        fastmvit.load("s", weights=tmp_path / "empty.pth")
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        fastmvit.load("s", weights=tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="directory without model.safetensors or pytorch_model.bin"):
        fastmvit.load("s", weights=tmp_path)


def test_pickle_of_numbers_holds_no_tensors(tmp_path):
    path = tmp_path / "numbers.pth"
    torch.save({"epoch": 3, "lr": 0.1}, path)
    with pytest.raises(CheckpointError, match="holds no tensors"):
        fastmvit.load("s", weights=path)
