"""Pretrained weights: the fastmvit cache, the Hugging Face hub cache, a download through huggingface_hub
(stubbed at the network boundary: tests never touch the network) and the error when none works."""
import json
import os
import re
import socket
import subprocess
import sys

import huggingface_hub
import pytest
from PIL import Image
from safetensors.torch import save_file

import fastmvit
from fastmvit import OptionError, WeightsNotFoundError
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


def _hub_answers(monkeypatch, asked=None):
    """Stub the hub's answer to the one metadata request made before a download (the network boundary)."""
    def metadata(url, **kwargs):
        if asked is not None:
            asked.append(url)
        return object()

    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", metadata)


def test_download_through_huggingface_hub(xxs_timm_state, tmp_path, monkeypatch):
    """Not cached and online: the hub is asked once for the file, then hf_hub_download fetches the timm
    repository's model.safetensors."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    asked, calls = [], []
    _hub_answers(monkeypatch, asked)

    def fake_download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename))
        path = tmp_path / filename
        save_file(xxs_timm_state, str(path))
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    model = fastmvit.load("xxs")
    assert calls == [("timm/mobilevit_xxs.cvnets_in1k", "model.safetensors")]
    assert len(asked) == 1 and asked[0].endswith("/timm/mobilevit_xxs.cvnets_in1k/resolve/main/model.safetensors")
    assert model.pretrained_cfg["source_format"] == "timm"


def test_apple_tag_reads_hf_layout_with_bgr_preprocessing(xxs_timm_state, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    _hub_answers(monkeypatch)
    hf_state = from_canonical(xxs_timm_state, "xxs", "hf")

    def fake_download(repo_id, filename, **kwargs):
        assert repo_id == "apple/mobilevit-xx-small"
        save_file({k: v.contiguous() for k, v in hf_state.items()}, str(tmp_path / filename))
        return str(tmp_path / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    model = fastmvit.load("xxs", pretrained="apple")
    assert model.pretrained_cfg["source_format"] == "hf"
    assert model.pretrained_cfg["preprocess"].channel_order == "BGR"


# Run in a fresh interpreter, with the hub at $HF_ENDPOINT (huggingface_hub reads it at import): each front
# end in turn; prints, per front end, the exit status (0 for the Python API's exception) and the message.
FRONT_ENDS = r"""
import contextlib, io, json, sys, fastmvit
from fastmvit.__main__ import main

out = {}
try:
    fastmvit.load(sys.argv[1])
except fastmvit.WeightsNotFoundError as e:
    out["python"] = [0, str(e)]
for name, argv in json.loads(sys.argv[2]).items():
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        out[name] = [main(argv), err.getvalue()]
print(json.dumps(out))
"""


def _front_ends(endpoint, model, commands, **env):
    """Every front end's answer to a missing checkpoint, from a fresh interpreter pointed at ``endpoint``,
    and what huggingface_hub logged (its "Retrying in Ns" lines, if it retried)."""
    env = {**os.environ, "HF_ENDPOINT": endpoint, "FASTMVIT_CACHE": env.pop("cache"), "HF_HUB_CACHE": env.pop("cache_hf"),
           **env}
    env.pop("HF_HUB_OFFLINE", None)
    r = subprocess.run([sys.executable, "-c", FRONT_ENDS, model, json.dumps(commands)], capture_output=True,
                       text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.splitlines()[-1]), r.stderr


def _closed_port() -> int:
    """A local TCP port nothing listens on: a connection to it is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_hub_fails_at_once_with_each_front_ends_remedy(tmp_path):
    """The hub really unreachable ($HF_ENDPOINT at a closed local port, nothing stubbed): one refused
    connection per front end, none of huggingface_hub's retries, and each front end's own remedies."""
    image = tmp_path / "cat.png"
    Image.new("RGB", (64, 64), "orange").save(image)
    commands = {"predict": ["predict", str(image), "--model", "s"],
                "serve": ["serve", "--model", "s", "--port", "1"],  # fails before it would listen
                "serve triton": ["serve", "triton", str(tmp_path / "repo"), "--model", "s", "--device", "cpu"]}
    out, log = _front_ends(f"http://127.0.0.1:{_closed_port()}", "s", commands, cache=str(tmp_path / "c"),
                           cache_hf=str(tmp_path / "hf"))
    assert "Retrying" not in log, log  # huggingface_hub's backoff (1 + 2 + 4 + 8 + 8 s per file) never ran
    assert set(out) == {"python", *commands}
    for front_end, (status, msg) in out.items():
        assert "timm/mobilevit_s.cvnets_in1k" in msg and "did not answer" in msg and "refused" in msg, front_end
        assert "mobilevit_s.cvnets_in1k.safetensors" in msg and "$FASTMVIT_CACHE" in msg, front_end
        assert "Traceback" not in msg
        if front_end == "python":
            assert "weights='/path/to/model.safetensors'" in msg and "fastmvit.load('s', pretrained=False)" in msg
            assert "--weights" not in msg and "--random" not in msg
        else:
            # (serve may first say what it is loading)
            assert status == 2 and "\nerror: pretrained weights for 's'" in "\n" + msg, (front_end, msg)
            assert "--weights /path/to/model.safetensors" in msg and "--random" in msg, front_end
            assert "pretrained=False" not in msg and "weights=" not in msg, front_end


def test_silent_hub_gives_up_after_the_short_timeout(tmp_path):
    """A hub that accepts the connection and never answers (as a black-holed network does): the one request
    gives up after FASTMVIT_HUB_TIMEOUT instead of huggingface_hub's 10 s, five times over."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)  # the kernel completes the connections; nobody reads or answers
        out, log = _front_ends(f"http://127.0.0.1:{server.getsockname()[1]}", "xxs", {}, cache=str(tmp_path / "c"),
                               cache_hf=str(tmp_path / "hf"), FASTMVIT_HUB_TIMEOUT="0.5")
    assert "Retrying" not in log, log
    assert re.search(r"did not answer \(\w*Timeout", out["python"][1]), out["python"][1]


def test_offline_mode_never_calls_the_network(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", _no_download)
    with pytest.raises(WeightsNotFoundError, match="HF_HUB_OFFLINE is set"):
        fastmvit.load("v2-1.0")


def test_unknown_tag():
    with pytest.raises(OptionError, match=r"no pretrained weights tagged 'in21k'; available: \['cvnets_in1k'"):
        fastmvit.load("s", pretrained="in21k")


def test_random_weights_need_no_file():
    model = fastmvit.load("v2-0.75", pretrained=False)
    assert model.pretrained_cfg["file"] is None and model.num_classes == 1000
