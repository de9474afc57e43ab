"""``python -m fastmvit predict`` and ``info`` as a user runs them."""
import os
import subprocess
import sys

import pytest
from PIL import Image
from safetensors.torch import save_file

import fastmvit

from .utils import randomize_


def _run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "fastmvit", *args], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}, timeout=300)


@pytest.fixture(scope="module")
def checkpoint_and_images(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model = randomize_(fastmvit.load("xxs", pretrained=False), seed=31)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / "xxs.safetensors"))
    for i, colour in enumerate(["red", "navy"]):
        Image.new("RGB", (300, 200), colour).save(root / f"img{i}.jpg")
    return root


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
    # reported and skipped, not the end of the run: exit status 1 says some file was skipped
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "skipped: " in r.stdout and "is not an image" in r.stdout and str(bad) in r.stderr


def test_info_reports_versions_and_devices():
    r = _run("info")
    assert r.returncode == 0, r.stderr
    for key in ("fastmvit", "torch", "triton", "devices", "compiled extension"):
        assert key in r.stdout
