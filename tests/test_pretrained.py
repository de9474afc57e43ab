"""Pretrained weights: the fastmvit cache, the Hugging Face hub cache, a download through huggingface_hub
(stubbed at the network boundary: tests never touch the network) and the error when none works."""
import huggingface_hub
import pytest
from safetensors.torch import save_file

import fastmvit
from fastmvit import WeightsNotFoundError
from fastmvit.variants import VARIANTS
from fastmvit.weights import from_canonical, pretrained_tags

from .utils import randomize_


@pytest.fixture(scope="module")
def xxs_timm_state():
    model = randomize_(fastmvit.load("xxs", pretrained=False), seed=21)
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def test_every_variant_has_a_default_checkpoint():
    for v in VARIANTS.values():
        tags = pretrained_tags(v)
        default = next(iter(tags.values()))
        assert default.repo_id == f"timm/{v.timm_name}.cvnets_in1k"
        assert default.filenames[0] == "model.safetensors"
    assert "cvnets_in22k_ft_in1k_384" in pretrained_tags(VARIANTS["v2-2.0"])
    assert pretrained_tags(VARIANTS["s"])["apple"].repo_id == "apple/mobilevit-small"


def test_fastmvit_cache_is_looked_up_first(xxs_timm_state, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTMVIT_CACHE", str(tmp_path))
    save_file(xxs_timm_state, str(tmp_path / "mobilevit_xxs.cvnets_in1k.safetensors"))
    model = fastmvit.load("xxs")
    assert model.pretrained_cfg["file"] == str(tmp_path / "mobilevit_xxs.cvnets_in1k.safetensors")
    assert model.pretrained_cfg["tag"] == "cvnets_in1k"
    # timm's v1 evaluation: RGB, bicubic, crop_pct 0.9 -> shorter side 284, crop 256
    pre = model.pretrained_cfg["preprocess"]
    assert (pre.channel_order, pre.interpolation, pre.resize, pre.input_size) == ("RGB", "bicubic", 284, 256)


def test_hugging_face_hub_cache_is_used(xxs_timm_state, tmp_path, monkeypatch):
    """A file in the real hub cache layout (models--org--name/snapshots/REV/FILE + refs/main) is found by
    huggingface_hub.try_to_load_from_cache, without any download."""
    import huggingface_hub.constants as hfc

    monkeypatch.setattr(hfc, "HF_HUB_CACHE", str(tmp_path))
    repo = tmp_path / "models--timm--mobilevit_xxs.cvnets_in1k"
    snapshot = repo / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    save_file(xxs_timm_state, str(snapshot / "model.safetensors"))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", _no_download)
    model = fastmvit.load("mobilevit_xxs")
    assert model.pretrained_cfg["file"] == str(snapshot / "model.safetensors")


def _no_download(*args, **kwargs):
    raise AssertionError("must not download when the file is cached")


def test_download_through_huggingface_hub(xxs_timm_state, tmp_path, monkeypatch):
    """Not cached and online: hf_hub_download is asked for the timm repository's model.safetensors."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    calls = []

    def fake_download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename))
        path = tmp_path / filename
        save_file(xxs_timm_state, str(path))
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    model = fastmvit.load("xxs")
    assert calls == [("timm/mobilevit_xxs.cvnets_in1k", "model.safetensors")]
    assert model.pretrained_cfg["source_format"] == "timm"


def test_apple_tag_reads_hf_layout_with_bgr_preprocessing(xxs_timm_state, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    hf_state = from_canonical(xxs_timm_state, "xxs", "hf")

    def fake_download(repo_id, filename, **kwargs):
        assert repo_id == "apple/mobilevit-xx-small"
        save_file({k: v.contiguous() for k, v in hf_state.items()}, str(tmp_path / filename))
        return str(tmp_path / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    model = fastmvit.load("xxs", pretrained="apple")
    assert model.pretrained_cfg["source_format"] == "hf"
    assert model.pretrained_cfg["preprocess"].channel_order == "BGR"


def test_no_network_error_says_how_to_continue(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def unreachable(repo_id, filename, **kwargs):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", unreachable)
    with pytest.raises(WeightsNotFoundError) as err:
        fastmvit.load("s")
    msg = str(err.value)
    assert "timm/mobilevit_s.cvnets_in1k" in msg and "name resolution" in msg
    assert "weights='/path/to/model.safetensors'" in msg
    assert "fastmvit.load('s', pretrained=False)" in msg
    assert "mobilevit_s.cvnets_in1k.safetensors" in msg  # where to put it in the cache


def test_offline_mode_never_calls_the_network(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", _no_download)
    with pytest.raises(WeightsNotFoundError, match="HF_HUB_OFFLINE is set"):
        fastmvit.load("v2-1.0")


def test_unknown_tag():
    with pytest.raises(ValueError, match=r"no pretrained weights tagged 'in21k'; available: \['cvnets_in1k'"):
        fastmvit.load("s", pretrained="in21k")


def test_random_weights_need_no_file():
    model = fastmvit.load("v2-0.75", pretrained=False)
    assert model.pretrained_cfg["file"] is None and model.num_classes == 1000
