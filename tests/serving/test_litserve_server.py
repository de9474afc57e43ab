"""A real LitServe server, started with `python -m fastmvit serve` in its own process group on a free port,
queried over HTTP: answers equal the in-process model's, every bad input gets its own 4xx while good
requests around it are answered, and concurrent requests are batched."""
import base64
import io
import json
import random
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from .helpers import (INPUT_SIZE, MAX_BATCH, MODEL, SECRET, assert_same_top_k, bad_images, get, post, preprocessed,
                      litserve_process, prometheus_samples, reference_logits)

pytest.importorskip("litserve", reason="the serve extra (litserve) is not installed")
pytest.importorskip("prometheus_client", reason="prometheus-client is not installed")

MAX_BODY = 450_000  # room for a batch of two 128x128 float32 images, to refuse it for its batch
BAD_STATUS = {"not_an_image": 415, "truncated_jpeg": 400, "one_pixel": 422, "bomb": 413, "over_pixel_limit": 413,
              "over_large_body": 413, "empty": 400}


def npy(array) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def tensor_bad_inputs():
    """name -> (.npy body, status, what the message must mention)."""
    S = INPUT_SIZE
    return {
        "tensor_wrong_shape": (npy(np.zeros((3, 64, 64), np.float32)), 422, "shape [3, 128, 128]"),
        "tensor_wrong_dtype": (npy(np.zeros((3, S, S), np.float16)), 422, "float32"),
        "tensor_batch_of_2": (npy(np.zeros((2, 3, S, S), np.float32)), 422, "one image per request"),
        "tensor_empty_batch": (npy(np.zeros((0, 3, S, S), np.float32)), 422, "one image per request"),
        "tensor_nan": (npy(np.full((3, S, S), np.nan, np.float32)), 422, "NaN or infinite"),
        "tensor_inf": (npy(np.where(np.eye(S, dtype=bool), np.inf, 0.5).astype(np.float32)[None].repeat(3, 0)), 422,
                       "NaN or infinite"),
    }


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    with litserve_process(["--model", MODEL, "--weights", checkpoint, "--host", "127.0.0.1",
                           "--input-size", str(INPUT_SIZE), "--max-batch-size", str(MAX_BATCH),
                           "--batch-timeout-ms", "50", "--max-body-bytes", str(MAX_BODY), "--log-level", "warning"],
                          tmp_path_factory.mktemp("litserve")) as (port, proc):
        yield port, proc


@pytest.fixture(scope="module")
def reference(checkpoint, images):
    logits = reference_logits(checkpoint, list(images.values()))
    return dict(zip(images, logits))


def test_health_turns_ready_only_after_warm_up(server):
    """/health answered nothing or 503 while the worker loaded and warmed up; by its first 200 every batch
    size had run (the worker reports ready only when setup(), which warms up, has returned)."""
    port, proc = server
    assert len(proc.statuses) > 1 and proc.statuses[-1] == 200 and 200 not in proc.statuses[:-1]
    status, text = get(port, "/metrics")
    warmed = prometheus_samples(text, "fastmvit_warmup_forwards_total")
    assert {k: v for k, v in warmed.items()} == {f'batch_size="{b}"': 1.0 for b in (1, 2, 4, 8)}
    # and the log said so while it happened: what loads, each batch size, then ready
    log = proc.log_tail(100_000)
    steps = ["loading xxs (weights ", "loaded xxs in ", "warm-up 1/4: batch 1 ", "warm-up 4/4: batch 8 ",
             "ready: warm-up of batch sizes 1, 2, 4, 8 took "]
    at = [log.find(step) for step in steps]
    assert -1 not in at and at == sorted(at), log[-3000:]


@pytest.mark.parametrize("name", ["noise.jpg", "gradient.jpg", "tall.png", "stripes.png", "grey.png", "rgba.png"])
def test_image_answer_equals_in_process(server, images, reference, name):
    # curl --data-binary sends application/x-www-form-urlencoded: the body is still the image
    status, answer = post(server[0], "/predict", images[name], "application/x-www-form-urlencoded")
    assert status == 200, answer
    assert all(set(a) == {"label", "score"} for a in answer)
    assert_same_top_k(answer, reference[name], 5)


def test_top_k_json_and_npy(server, images, reference, checkpoint):
    port = server[0]
    status, answer = post(port, "/predict?top_k=2", images["tall.png"], "image/png")
    assert status == 200 and len(answer) == 2
    assert_same_top_k(answer, reference["tall.png"], 2)
    doc = {"inputs": base64.b64encode(images["noise.jpg"]).decode(), "parameters": {"top_k": 3}}
    status, answer = post(port, "/predict", json.dumps(doc).encode(), "application/json")
    assert status == 200
    assert_same_top_k(answer, reference["noise.jpg"], 3)
    pixels = preprocessed(checkpoint, [images["grey.png"]])[0].numpy()
    status, answer = post(port, "/predict", npy(pixels), "application/x-npy")
    assert status == 200
    assert_same_top_k(answer, reference["grey.png"], 5)


@pytest.mark.parametrize("name", sorted(BAD_STATUS))
def test_bad_image(server, name):
    data, mentions = bad_images(MAX_BODY)[name]
    status, answer = post(server[0], "/predict", data, "image/jpeg")
    assert status == BAD_STATUS[name], answer
    assert mentions in answer["detail"] and SECRET.decode() not in str(answer)


@pytest.mark.parametrize("name", sorted(tensor_bad_inputs()))
def test_bad_tensor(server, name):
    body, status, mentions = tensor_bad_inputs()[name]
    got, answer = post(server[0], "/predict", body, "application/x-npy")
    assert (got, mentions in answer["detail"]) == (status, True), answer


@pytest.mark.parametrize("body, content_type, status, mentions", [
    (b'{"inputs": ', "application/json", 400, "not valid JSON"),
    (b'{"image": "abc"}', "application/json", 400, "inputs"),
    (b'{"inputs": "***' + SECRET + b'"}', "application/json", 400, "base64"),
    (b"--x\r\nContent-Disposition: form-data; name=f\r\n\r\nabc\r\n--x--", "multipart/form-data; boundary=x", 415,
     "--data-binary"),
], ids=["bad-json", "no-inputs", "bad-base64", "multipart"])
def test_malformed_requests(server, body, content_type, status, mentions):
    got, answer = post(server[0], "/predict", body, content_type)
    assert (got, mentions in answer["detail"]) == (status, True), answer
    assert SECRET.decode() not in str(answer)


@pytest.mark.parametrize("query", ["top_k=0", "top_k=1001", "top_k=two"])
def test_bad_top_k(server, images, query):
    status, answer = post(server[0], f"/predict?{query}", images["noise.jpg"])
    assert status == 422 and "top_k" in answer["detail"]


def test_good_and_bad_requests_together_are_batched_and_none_lost(server, images, reference):
    """Concurrent clients send good images with every bad input among them: each good one is answered
    correctly, each bad one gets its own 4xx, every request gets an answer, and batches of > 1 formed."""
    port = server[0]
    _, before = get(port, "/metrics")
    jobs = [("good", name, images[name], None) for name in images for _ in range(4)]
    jobs += [("bad", name, data, None) for name, (data, _) in bad_images(MAX_BODY).items()]
    jobs += [("bad-tensor", name, body, "application/x-npy") for name, (body, _, _) in tensor_bad_inputs().items()]
    random.Random(0).shuffle(jobs)
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda job: post(port, "/predict", job[2], job[3]), jobs))
    assert len(results) == len(jobs)
    for (kind, name, _, _), (status, answer) in zip(jobs, results):
        if kind == "good":
            assert status == 200, (name, answer)
            assert_same_top_k(answer, reference[name], 5)
        elif kind == "bad":
            assert status == BAD_STATUS[name], (name, answer)
        else:
            assert status == tensor_bad_inputs()[name][1], (name, answer)
    _, after = get(port, "/metrics")
    batches = {k: prometheus_samples(after, "fastmvit_batch_size_bucket").get(k, 0) -
               prometheus_samples(before, "fastmvit_batch_size_bucket").get(k, 0) for k in ('le="1.0"', 'le="+Inf"')}
    goods = sum(kind == "good" for kind, *_ in jobs)
    images_run = (prometheus_samples(after, "fastmvit_batch_size_sum")[""] -
                  prometheus_samples(before, "fastmvit_batch_size_sum")[""])
    assert images_run == goods  # every good request ran, no bad one reached the model
    assert batches['le="+Inf"'] - batches['le="1.0"'] > 0, "no batch of more than one request formed"
    assert batches['le="+Inf"'] < goods


def test_metrics_for_prometheus(server, images):
    # one good and one refused request of this test's own, whichever tests ran before it in this worker
    assert post(server[0], "/predict", images["grey.png"], "image/png")[0] == 200
    assert post(server[0], "/predict", bad_images(MAX_BODY)["not_an_image"][0], "image/jpeg")[0] == 415
    status, text = get(server[0], "/metrics")
    assert status == 200
    for name in ("fastmvit_requests_total", "fastmvit_request_seconds_bucket", "fastmvit_decode_seconds_count",
                 "fastmvit_batch_size_bucket", "fastmvit_forward_seconds_sum"):
        assert name in text
    codes = prometheus_samples(text, "fastmvit_requests_total")
    assert codes['code="200"'] > 0 and codes['code="415"'] > 0
    assert get(server[0], "/health")[0] == 200  # still serving after everything above
