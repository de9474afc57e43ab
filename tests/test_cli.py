"""``python -m fastmvit predict`` and ``info`` as a user runs them, and the one error path every command shares."""
import json
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
    # the command line's remedies (--weights, --random), not the Python API's (pretrained=False)
    assert "error: pretrained weights for 's'" in r.stderr and "--random" in r.stderr and "--weights" in r.stderr
    assert "pretrained=False" not in r.stderr
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


# Many commands in one fresh interpreter (a start costs seconds): each one's exit status and stderr, as
# `python -m fastmvit ...` would give them (main() returns the status that __main__ passes to sys.exit).
MANY = r"""
import contextlib, io, json, sys
from fastmvit.__main__ import main

out = {}
for name, argv in json.loads(sys.argv[1]).items():
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            status = main(argv)
        except SystemExit as e:  # argparse's own errors
            status = e.code
    out[name] = [status, err.getvalue()]
print(json.dumps(out))
"""


def _run_many(commands):
    r = subprocess.run([sys.executable, "-c", MANY, json.dumps(commands)], capture_output=True, text=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.splitlines()[-1])


def test_every_command_reports_a_bad_name_or_option_the_same_way(checkpoint_and_images, tmp_path):
    """Any fastmvit error, from any command: `error: ...` on stderr (first line), exit status 2, no
    traceback; the message names what was wrong."""
    root = checkpoint_and_images
    image, weights = str(root / "img0.jpg"), str(root / "xxs.safetensors")
    not_results = tmp_path / "results.json"
    not_results.write_bytes(b"\xff\xd8 not json")
    bad_name = "error: unknown MobileViT variant 'xl'; valid names: 'xxs'"
    cases = {
        "predict --model": (["predict", image, "--model", "xl", "--random"], bad_name),
        "bench --models": (["bench", "--models", "xl"], bad_name),
        "bench roofline --models": (["bench", "roofline", "--models", "xl"], bad_name),
        "bench kernels --models": (["bench", "kernels", "--models", "xl"], bad_name),
        "serve --model": (["serve", "--model", "xl"], bad_name),
        "serve triton --model": (["serve", "triton", str(tmp_path / "repo"), "--model", "xl"], bad_name),
        "predict --device": (["predict", image, "--model", "xxs", "--random", "--device", "gpu"],
                             "error: unknown device 'gpu'; use cpu, cuda or cuda:N"),
        "predict a missing source": (["predict", str(root / "nope"), "--model", "xxs", "--random", "--device", "cpu"],
                                     f"error: {str(root / 'nope')!r} is not a file, a folder or a glob pattern"),
        "predict --weights missing": (["predict", image, "--model", "xxs", "--weights", str(tmp_path / "no.pt")],
                                      "error: no such checkpoint file"),
        "predict --weights of another variant": (["predict", image, "--model", "s", "--weights", weights],
                                                 "error: "),
        "bench --dtypes": (["bench", "--dtypes", "float8"], "error: unknown dtype(s) ['float8']"),
        "bench --batches": (["bench", "--batches", "1,x"], "error: --batches must be positive integers"),
        "bench --engines": (["bench", "--engines", "nope"], "error: unknown engine(s) ['nope']"),
        "bench --device": (["bench", "--device", "tpu"], "error: unknown device 'tpu'"),
        "bench --threads": (["bench", "--threads", "0", "--no-measure-peak"], "error: --threads must be at least 1"),
        "bench report missing": (["bench", "report", str(tmp_path / "none.json")], "error: no such results file"),
        "bench report not JSON": (["bench", "report", str(not_results)], f"error: {not_results}: not a fastmvit "
                                                                        "results file"),
        "bench kernels --family": (["bench", "kernels", "--family", "fft"], "error: unknown kernel family 'fft'"),
        "bench engines --dtype": (["bench", "engines", "--dtype", "int8"], "error: --dtype takes float32"),
    }
    if not torch.cuda.is_available():
        cases["bench --device cuda"] = (["bench", "--device", "cuda"], "error: device 'cuda': CUDA is not available")
    out = _run_many({name: argv for name, (argv, _) in cases.items()})
    for name, (argv, first) in cases.items():
        status, err = out[name]
        assert status == 2 and err.startswith(first) and "Traceback" not in err, (name, status, err[-2000:])
    # argparse's own errors (an option it cannot parse) share the status
    out = _run_many({"--top 0": ["predict", image, "--top", "0"], "no command": []})
    assert out["--top 0"][0] == 2 and "--top: expected a positive integer, got '0'" in out["--top 0"][1]
    assert out["no command"][0] == 2


def test_exit_status_reaches_the_shell():
    r = _run("predict", "cat.jpg", "--model", "xl", "--random")
    assert r.returncode == 2 and r.stderr.startswith("error: unknown MobileViT variant 'xl'"), r.stderr
