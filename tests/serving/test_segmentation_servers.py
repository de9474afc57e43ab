"""A segmentation model (DeepLabV3-xxs, random weights whose classes vary over the image) behind real servers:
`python -m fastmvit serve` (LitServe) and the tritonserver bundled in nvidia-pytriton, queried over HTTP.
Every mask is decoded and compared with the label map computed here independently: the image resized by
PIL so its shorter side is the input size, the in-process torch model, F.interpolate to the image's own
size and argmax. Odd sizes, several shapes in one batch, bad images."""
import base64
import io
import json
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

import fastmvit
from fastmvit.masks import VOC_CLASSES
from fastmvit.serving.common import InputLimits
from fastmvit.serving.launch import ServerProcess, default_install_dir, find_tritonserver, free_port
from fastmvit.serving.triton import write_model_repository

from ..utils import photo
from .helpers import SEGMENTATION_MODEL as MODEL
from .helpers import SEGMENTATION_SIZE as SIZE
from .helpers import (SECRET, assert_mask, bad_images, get, image_ref, png, post, prometheus_samples, reference,
                      litserve_process, serve_env, write_segmentation_checkpoint)

MAX_BATCH = 4
MAX_BODY = 300_000
BAD_STATUS = {"not_an_image": 415, "truncated_jpeg": 400, "one_pixel": 422, "bomb": 413, "over_pixel_limit": 413,
              "over_large_body": 413, "empty": 400}
# (width, height): odd sizes; 97x131 and 194x262 resize to the same input (64 x 86), so they share a forward
# while their masks have different sizes; 131x97 is the first one's transpose
SIZES = [(97, 131), (194, 262), (131, 97), (61, 45), (120, 90)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_segmentation_checkpoint(tmp_path_factory.mktemp("seg") / "deeplabv3-xxs.safetensors")


@pytest.fixture(scope="module")
def model(checkpoint):
    return fastmvit.load(MODEL, checkpoint)


@pytest.fixture(scope="module")
def pictures():
    """name -> encoded image; two different images of the same size, so a swap within a forward shows."""
    out = {f"{w}x{h}": png(photo(w, h, seed=i)) for i, (w, h) in enumerate(SIZES)}
    out["97x131-b"] = png(photo(97, 131, seed=50))
    return out


# -------------------------------------------------------------------------------------------------
# LitServe

@pytest.fixture(scope="module")
def litserve(checkpoint, tmp_path_factory):
    pytest.importorskip("litserve", reason="the serve extra (litserve) is not installed")
    with litserve_process(["--model", MODEL, "--weights", checkpoint, "--input-size", str(SIZE),
                           "--max-batch-size", str(MAX_BATCH), "--batch-timeout-ms", "100",
                           "--max-body-bytes", str(MAX_BODY), "--log-level", "warning"],
                          tmp_path_factory.mktemp("seg-litserve")) as (port, proc):
        yield port, proc


def test_litserve_warms_up_and_says_so(litserve):
    log = litserve[1].log_tail(100_000)
    steps = ["loading deeplabv3-xxs (weights ", "warm-up 1/3: batch 1 ", "warm-up 3/3: batch 4 ",
             "ready: warm-up of batch sizes 1, 2, 4 took "]
    at = [log.find(step) for step in steps]
    assert -1 not in at and at == sorted(at), log[-3000:]


@pytest.mark.parametrize("name", [f"{w}x{h}" for w, h in SIZES])
def test_litserve_json_mask_at_the_image_size(litserve, model, pictures, name):
    status, answer = post(litserve[0], "/predict", pictures[name], "image/png")
    assert status == 200, answer
    w, h = map(int, name.split("x"))
    assert (answer["width"], answer["height"]) == (w, h)
    got = assert_mask(base64.b64decode(answer["mask"]), image_ref(model, pictures[name]))
    assert answer["labels"] == list(VOC_CLASSES)
    counts = np.bincount(got.ravel(), minlength=21)
    shares = {c["index"]: c["share"] for c in answer["classes"]}
    assert shares == {i: pytest.approx(n / got.size) for i, n in enumerate(counts) if n}
    assert [c["label"] for c in answer["classes"]] == [VOC_CLASSES[c["index"]] for c in answer["classes"]]
    assert [c["share"] for c in answer["classes"]] == sorted(shares.values(), reverse=True)


def test_litserve_bare_png_json_body_and_tensor(litserve, model, pictures):
    port, data = litserve[0], pictures["131x97"]
    status, answer = post_raw(port, data, {"Accept": "image/png", "Content-Type": "image/png"})
    assert status == 200 and answer[:8] == b"\x89PNG\r\n\x1a\n"
    assert_mask(answer, image_ref(model, data))
    doc = {"inputs": base64.b64encode(pictures["61x45"]).decode()}
    status, answer = post_raw(port, json.dumps(doc).encode(),
                              {"Content-Type": "application/json", "Accept": "application/json, image/png;q=0.5"})
    assert status == 200
    assert_mask(base64.b64decode(json.loads(answer)["mask"]), image_ref(model, pictures["61x45"]))
    # a preprocessed tensor [3, H, W] gets its mask at H x W
    x = torch.rand(3, 67, 81, generator=torch.Generator().manual_seed(4))
    buf = io.BytesIO()
    np.save(buf, x.numpy())
    status, answer = post(port, "/predict", buf.getvalue(), "application/x-npy")
    assert status == 200 and (answer["width"], answer["height"]) == (81, 67)
    assert_mask(base64.b64decode(answer["mask"]), reference(model, x, (67, 81)))


def post_raw(port, body, headers):
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("POST", "/predict", body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


@pytest.mark.parametrize("name", sorted(BAD_STATUS))
def test_litserve_bad_image(litserve, name):
    data, mentions = bad_images(MAX_BODY)[name]
    status, answer = post(litserve[0], "/predict", data, "image/jpeg")
    assert status == BAD_STATUS[name], answer
    assert mentions in answer["detail"] and SECRET.decode() not in str(answer)


def test_litserve_refuses_what_a_mask_cannot_be_made_for(litserve):
    port = litserve[0]
    status, answer = post(port, "/predict", png(photo(300, 50, seed=1)), "image/png")
    assert status == 422 and "more elongated than 4:1" in answer["detail"], answer
    for shape, mentions in [((3, 20, 64), "too small"), ((3, 64, 300), "exceeds"), ((1, 64, 64), "[3, H, W]"),
                            ((2, 3, 64, 64), "one image per request")]:
        buf = io.BytesIO()
        np.save(buf, np.zeros(shape, np.float32))
        status, answer = post(port, "/predict", buf.getvalue(), "application/x-npy")
        assert status == 422 and mentions in answer["detail"], (shape, answer)


def test_litserve_concurrent_masks_are_each_their_own(litserve, model, pictures):
    """Concurrent clients, images of several shapes and sizes, every one different (twelve share an input
    shape, at two sizes): each answer is its own image's mask, and forwards of more than one image (so of
    different images of one shape) ran."""
    port = litserve[0]
    jobs = dict(pictures)
    jobs.update({f"97x131-{k}": png(photo(97, 131, seed=100 + k)) for k in range(8)})
    jobs.update({f"194x262-{k}": png(photo(194, 262, seed=200 + k)) for k in range(4)})
    refs = {name: image_ref(model, data) for name, data in jobs.items()}
    names = list(jobs)
    np.random.default_rng(0).shuffle(names)
    _, before = get(port, "/metrics")
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda n: post_raw(port, jobs[n], {"Accept": "image/png"}), names))
    for name, (status, body) in zip(names, results):
        assert status == 200, (name, body)
        assert_mask(body, refs[name])
    _, after = get(port, "/metrics")
    hist = {k: prometheus_samples(after, "fastmvit_batch_size_bucket").get(k, 0) -
            prometheus_samples(before, "fastmvit_batch_size_bucket").get(k, 0) for k in ('le="1.0"', 'le="+Inf"')}
    assert hist['le="+Inf"'] - hist['le="1.0"'] > 0, "no forward of more than one image"


def test_serve_random_weights_from_the_command_line(tmp_path, pictures):
    """`python -m fastmvit serve --model deeplabv3-xxs --random`: loads, warms up saying so, answers a mask."""
    pytest.importorskip("litserve", reason="the serve extra (litserve) is not installed")
    with litserve_process(["--model", "deeplabv3-xxs", "--random", "--input-size", str(SIZE),
                           "--max-batch-size", "2"], tmp_path) as (port, proc):
        status, body = post_raw(port, pictures["61x45"], {"Accept": "image/png"})
        assert status == 200 and Image.open(io.BytesIO(body)).size == (61, 45)
        log = proc.log_tail(100_000)
    assert "loading deeplabv3-xxs (random weights) on cpu" in log and "warm-up 2/2: batch 2" in log
    assert "ready: warm-up of batch sizes 1, 2" in log
    r = subprocess.run([sys.executable, "-m", "fastmvit", "serve", "--model", "deeplabv3-xl", "--random"],
                       env=serve_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "unknown segmentation model 'deeplabv3-xl'" in r.stderr, r.stderr


# -------------------------------------------------------------------------------------------------
# Triton

@pytest.fixture(scope="module")
def triton(checkpoint, tmp_path_factory):
    httpclient = pytest.importorskip("tritonclient.http", reason="the serve extra (tritonclient) is not installed")
    install = find_tritonserver()
    if install is None:
        pytest.skip(f"no tritonserver set up at {default_install_dir()}: run `bash .ci/setup_serving.sh`")
    root = tmp_path_factory.mktemp("seg-triton")
    model_dir = write_model_repository(root / "repo", MODEL, checkpoint, kind="cpu", max_batch_size=MAX_BATCH,
                                       input_size=SIZE, max_queue_delay_us=50_000,
                                       limits=InputLimits(max_bytes=MAX_BODY))
    ports = [free_port() for _ in range(3)]
    env = install.env()
    env["OMP_NUM_THREADS"] = "1"
    proc = ServerProcess(install.command(str(root / "repo"), *ports), env=env, log_path=str(root / "server.log"),
                         name="tritonserver").start()
    try:
        proc.wait_ready(f"http://127.0.0.1:{ports[0]}/v2/health/ready", timeout=300)
        yield httpclient, ports, model_dir
    finally:
        proc.stop()


def bytes_input(httpclient, items):
    arr = np.array([[x] for x in items], dtype=np.object_)
    i = httpclient.InferInput("image_bytes", list(arr.shape), "BYTES")
    i.set_data_from_numpy(arr)
    return i


def test_triton_repository_declares_mask_png_and_labels(triton):
    httpclient, ports, model_dir = triton
    config = httpclient.InferenceServerClient(f"127.0.0.1:{ports[0]}").get_model_config("fastmvit")
    assert [(o["name"], o["data_type"], o["dims"]) for o in config["output"]] == [("mask_png", "TYPE_STRING", [1])]
    assert {i["name"]: i["dims"] for i in config["input"]}["image"] == [3, -1, -1]
    assert (model_dir / "labels.txt").read_text().splitlines() == list(VOC_CLASSES)


def test_triton_masks_of_one_request_in_order(triton, model, pictures):
    """One request of four images: two share an input shape but not a size, one is another's transpose."""
    httpclient, ports, _ = triton
    client = httpclient.InferenceServerClient(f"127.0.0.1:{ports[0]}")
    names = ["97x131", "131x97", "194x262", "97x131-b"]
    result = client.infer("fastmvit", [bytes_input(httpclient, [pictures[n] for n in names])])
    masks = result.as_numpy("mask_png")
    assert masks.shape == (4, 1)
    for name, m in zip(names, masks[:, 0]):
        assert_mask(m, image_ref(model, pictures[name]))


def test_triton_tensor_of_an_odd_size(triton, model):
    httpclient, ports, _ = triton
    client = httpclient.InferenceServerClient(f"127.0.0.1:{ports[0]}")
    x = torch.rand(2, 3, 67, 81, generator=torch.Generator().manual_seed(5))
    i = httpclient.InferInput("image", [2, 3, 67, 81], "FP32")
    i.set_data_from_numpy(x.numpy())
    masks = client.infer("fastmvit", [i]).as_numpy("mask_png")
    for row, m in zip(x, masks[:, 0]):
        assert_mask(m, reference(model, row, (67, 81)))


def test_triton_concurrent_requests_and_bad_images(triton, model, pictures):
    """Concurrent requests (one client per thread) of every shape with bad images among them: each good one
    gets its own mask, each bad one its own 400."""
    httpclient, ports, _ = triton
    from tritonclient.utils import InferenceServerException

    refs = {name: image_ref(model, data) for name, data in pictures.items()}
    bad = bad_images(MAX_BODY)
    jobs = [("good", n) for n in pictures for _ in range(2)] + [("bad", n) for n in ("not_an_image", "one_pixel", "bomb")]
    np.random.default_rng(1).shuffle(jobs)
    local = threading.local()

    def run(job):
        if not hasattr(local, "client"):
            local.client = httpclient.InferenceServerClient(f"127.0.0.1:{ports[0]}")
        kind, name = job
        data = pictures[name] if kind == "good" else bad[name][0]
        try:
            return local.client.infer("fastmvit", [bytes_input(httpclient, [data])]).as_numpy("mask_png")
        except InferenceServerException as e:
            return e

    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(run, jobs))
    for (kind, name), result in zip(jobs, results):
        if kind == "good":
            assert not isinstance(result, Exception), (name, result)
            assert_mask(result[0, 0], refs[name])
        else:
            assert isinstance(result, InferenceServerException) and result.status() == "400", (name, result)
            assert bad[name][1] in result.message()
