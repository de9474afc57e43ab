"""``python -m fastmvit predict`` and ``info`` as a user runs them."""
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import fastmvit

from .utils import image_sensitive_


def _run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "fastmvit", *args], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}, timeout=300)


@pytest.fixture(scope="module")
def checkpoint_and_images(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model = image_sensitive_(fastmvit.load("xxs", pretrained=False), size=256, seed=31)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / "xxs.safetensors"))
    for i, colour in enumerate(["red", "navy"]):
        Image.new("RGB", (300, 200), colour).save(root / f"img{i}.jpg")
    return root


def _expected_top5(root, names):
    """The same weights and files through the Python API: what the command must print."""
    model = fastmvit.load("xxs", weights=root / "xxs.safetensors", num_classes=None)
    batch = fastmvit.preprocess([root / n for n in names], model.pretrained_cfg["preprocess"])
    with torch.inference_mode():
        return fastmvit.topk(model(batch), k=5)


def test_predict_prints_top5_for_each_image(checkpoint_and_images):
    root = checkpoint_and_images
    r = _run("predict", str(root / "img0.jpg"), str(root / "img1.jpg"), "--model", "xxs",
             "--weights", str(root / "xxs.safetensors"), "--device", "cpu")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].endswith("img0.jpg") and lines[6].endswith("img1.jpg")
    rows = [line for line in lines if line.startswith("  ")]
    assert len(rows) == 10
    scores = [float(line.split("%")[0]) for line in rows[:5]]
    assert scores == sorted(scores, reverse=True) and all(0 < s <= 100 for s in scores)
    # the predictions themselves, image by image (the weights give the two colours different classes)
    expected = _expected_top5(root, ["img0.jpg", "img1.jpg"])
    assert expected[0][0]["index"] != expected[1][0]["index"]
    for i, top in enumerate(expected):
        printed = [(float(r.split("%")[0]), int(r.rsplit("(", 1)[1].rstrip(")"))) for r in rows[5 * i:5 * i + 5]]
        assert [idx for _, idx in printed] == [t["index"] for t in top], f"image {i}"
        assert all(abs(score - 100 * t["score"]) <= 0.006 for (score, _), t in zip(printed, top)), f"image {i}"


def test_predict_without_weights_offline_explains(checkpoint_and_images, tmp_path):
    r = _run("predict", str(checkpoint_and_images / "img0.jpg"), "--model", "s",
             env={"FASTMVIT_CACHE": str(tmp_path), "HF_HUB_CACHE": str(tmp_path)})
    assert r.returncode == 2
    assert "error: pretrained weights for 's'" in r.stderr and "pretrained=False" in r.stderr
    assert "Traceback" not in r.stderr


def test_predict_bad_image(checkpoint_and_images, tmp_path):
    bad = tmp_path / "notes.jpg"
    bad.write_text("not an image")
    r = _run("predict", str(bad), "--model", "xxs", "--random", "--device", "cpu")
    assert r.returncode == 2 and "is not an image" in r.stderr and "Traceback" not in r.stderr


def test_info_reports_versions_and_devices():
    r = _run("info")
    assert r.returncode == 0, r.stderr
    for key in ("fastmvit", "torch", "triton", "devices", "compiled extension"):
        assert key in r.stdout
