"""A real tritonserver (the binary bundled in nvidia-pytriton, set up by .ci/setup_serving.sh) serving the
repository fastmvit.serving.triton writes, on the CPU, queried with tritonclient over HTTP and gRPC:
answers equal the in-process model's, every bad input gets its own 400 while the rest of its batch is
answered, and concurrent requests are batched into one forward."""
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from fastmvit.serving.common import InputLimits
from fastmvit.serving.launch import ServerProcess, default_install_dir, find_tritonserver, free_port
from fastmvit.serving.triton import write_model_repository

from .helpers import (INPUT_SIZE, MAX_BATCH, MODEL, SECRET, bad_images, get, post, preprocessed, prometheus_samples,
                      reference_logits)

httpclient = pytest.importorskip("tritonclient.http", reason="the serve extra (tritonclient[http]) is not installed")
grpcclient = pytest.importorskip("tritonclient.grpc", reason="the serve extra (tritonclient[grpc]) is not installed")
from tritonclient.utils import InferenceServerException  # noqa: E402

MAX_BODY = 300_000
TOP_K = 5
NAME = "fastmvit"
OUTPUTS = ("logits", "topk_indices", "topk_scores", "topk_labels")


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    install = find_tritonserver()
    if install is None:
        pytest.skip(f"no tritonserver set up at {default_install_dir()}: run `bash .ci/setup_serving.sh` (it "
                    f"unpacks the tritonserver that the nvidia-pytriton wheel bundles)")
    root = tmp_path_factory.mktemp("triton")
    write_model_repository(root / "repo", MODEL, checkpoint, kind="cpu", max_batch_size=MAX_BATCH, top_k=TOP_K,
                           input_size=INPUT_SIZE, max_queue_delay_us=20_000, limits=InputLimits(max_bytes=MAX_BODY))
    ports = [free_port() for _ in range(3)]
    env = install.env()
    env["OMP_NUM_THREADS"] = "1"  # see test_litserve_faults.py: spinning OpenMP threads on a shared CPU
    proc = ServerProcess(install.command(str(root / "repo"), *ports), env=env,
                         log_path=str(root / "server.log"), name="tritonserver").start()
    try:
        proc.wait_ready(f"http://127.0.0.1:{ports[0]}/v2/health/ready", timeout=300)
        yield ports, proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def http(server):
    return httpclient.InferenceServerClient(f"127.0.0.1:{server[0][0]}")


@pytest.fixture(scope="module")
def grpc(server):
    return grpcclient.InferenceServerClient(f"127.0.0.1:{server[0][1]}")


@pytest.fixture(scope="module")
def reference(checkpoint, images):
    return reference_logits(checkpoint, list(images.values()))


def bytes_input(module, items):
    arr = np.array([[x] for x in items], dtype=np.object_)
    i = module.InferInput("image_bytes", list(arr.shape), "BYTES")
    i.set_data_from_numpy(arr)
    return i


def tensor_input(module, x, datatype="FP32", binary=True):
    i = module.InferInput("image", list(x.shape), datatype)
    if module is httpclient:
        i.set_data_from_numpy(x, binary_data=binary)
    else:
        i.set_data_from_numpy(x)
    return i


def check_outputs(result, ref: torch.Tensor):
    """All four outputs of a result against the in-process logits ``ref`` [N, C]."""
    logits = torch.tensor(result.as_numpy("logits"))
    assert logits.shape == ref.shape and logits.dtype == torch.float32  # float32 on the wire
    torch.testing.assert_close(logits, ref, rtol=1e-4, atol=2e-3 * float(ref.std()))
    probs = ref.softmax(-1)
    idx = result.as_numpy("topk_indices")
    assert idx.shape == (ref.shape[0], TOP_K) and idx.dtype == np.int64
    assert (idx[:, 0] == ref.argmax(-1).numpy()).all()
    np.testing.assert_allclose(result.as_numpy("topk_scores"), np.take_along_axis(probs.numpy(), idx, 1), rtol=1e-3)
    import fastmvit

    names = fastmvit.imagenet_classes()
    labels = result.as_numpy("topk_labels")
    text = [[b.decode() if isinstance(b, bytes) else b for b in row] for row in labels]  # JSON gives str
    assert text == [[names[i] for i in row] for row in idx]


def test_ready_only_after_warm_up(server, http):
    ports, proc = server
    assert proc.statuses[-1] == 200 and 200 not in proc.statuses[:-1]
    assert "warmed up at batch sizes [1, 2, 4, 8]" in proc.log_tail(200_000)
    assert http.is_model_ready(NAME)


def test_encoded_images_http(http, images, reference):
    result = http.infer(NAME, [bytes_input(httpclient, list(images.values()))])
    check_outputs(result, reference)


def test_tensors_http_binary_and_json_and_grpc(http, grpc, images, reference, checkpoint):
    x = preprocessed(checkpoint, list(images.values())).numpy()
    check_outputs(http.infer(NAME, [tensor_input(httpclient, x)]), reference)
    # pure Open Inference Protocol JSON, no binary extension, in and out
    outs = [httpclient.InferRequestedOutput(n, binary_data=False) for n in OUTPUTS]
    check_outputs(http.infer(NAME, [tensor_input(httpclient, x[:1], binary=False)], outputs=outs), reference[:1])
    check_outputs(grpc.infer(NAME, [tensor_input(grpcclient, x)]), reference)
    check_outputs(grpc.infer(NAME, [bytes_input(grpcclient, list(images.values())[:3])]), reference[:3])


def test_classification_extension(http, images, reference):
    out = httpclient.InferRequestedOutput("logits", class_count=3)
    result = http.infer(NAME, [bytes_input(httpclient, [images["tall.png"]])], outputs=[out])
    best = result.as_numpy("logits")[0][0].decode().split(":")
    assert int(best[1]) == int(reference[2].argmax()) and best[2] == __import__("fastmvit").imagenet_classes()[int(best[1])]


BAD_BYTES = sorted(bad_images(MAX_BODY))


@pytest.mark.parametrize("name", BAD_BYTES)
def test_bad_encoded_image(http, grpc, name):
    data, mentions = bad_images(MAX_BODY)[name]
    with pytest.raises(InferenceServerException) as info:
        http.infer(NAME, [bytes_input(httpclient, [data])])
    assert info.value.status() == "400" and mentions in info.value.message()
    assert SECRET.decode() not in info.value.message()
    with pytest.raises(InferenceServerException) as info:
        grpc.infer(NAME, [bytes_input(grpcclient, [data])])
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT" and mentions in info.value.message()


def bad_tensors():
    S = INPUT_SIZE
    ok = np.full((1, 3, S, S), 0.5, np.float32)
    nan = ok.copy()
    nan[0, 1, 2, 3] = np.nan
    return {  # name -> (inputs, what the message mentions)
        "wrong_shape": ([("image", np.zeros((1, 3, 64, 64), np.float32), "FP32")], "unexpected shape"),
        "wrong_dtype": ([("image", ok.astype(np.float64), "FP64")], "FP64"),
        "batch_too_large": ([("image", np.zeros((MAX_BATCH + 1, 3, S, S), np.float32), "FP32")], "batch-size"),
        "no_batch_dim": ([("image", ok[0], "FP32")], "shape"),
        "nan": ([("image", nan, "FP32")], "NaN"),
        "both_inputs": ([("image", ok, "FP32"), ("image_bytes", np.array([[b"x"]], np.object_), "BYTES")],
                        "exactly one"),
        "unknown_input": ([("pixels", ok, "FP32")], "pixels"),
        "bytes_batch_too_large": ([("image_bytes", np.array([[b"x"]] * (MAX_BATCH + 1), np.object_), "BYTES")],
                                  "batch-size"),
    }


def make_inputs(module, spec):
    inputs = []
    for name, arr, dtype in spec:
        i = module.InferInput(name, list(arr.shape), dtype)
        i.set_data_from_numpy(arr)
        inputs.append(i)
    return inputs


@pytest.mark.parametrize("name", sorted(bad_tensors()))
def test_bad_tensor(http, grpc, name):
    spec, mentions = bad_tensors()[name]
    for module, client, status in [(httpclient, http, "400"), (grpcclient, grpc, "StatusCode.INVALID_ARGUMENT")]:
        with pytest.raises(InferenceServerException) as info:
            client.infer(NAME, make_inputs(module, spec))
        assert info.value.status() == status and mentions in info.value.message(), info.value.message()


def test_empty_body_and_no_input(server):
    port = server[0][0]
    status, answer = post(port, f"/v2/models/{NAME}/infer", b"")
    assert status == 400, answer
    status, answer = post(port, f"/v2/models/{NAME}/infer", b'{"inputs": []}', "application/json")
    assert status == 400 and "0 inputs" in str(answer), answer  # the server core refuses it itself


def test_good_and_bad_requests_together_are_batched_and_none_lost(server, http, images, reference, checkpoint):
    """Concurrent HTTP clients (one per thread: tritonclient's are not thread-safe) and gRPC async requests
    send good images and tensors with every bad input among them: each good request is answered correctly,
    each bad one gets its own 400, nothing is lost, and requests were batched into multi-image forwards."""
    names = list(images)
    pixels = preprocessed(checkpoint, list(images.values())).numpy()
    jobs = [("bytes", i) for i in range(len(names)) for _ in range(3)] + [("tensor", i) for i in range(len(names))]
    jobs += [("bad", name) for name in BAD_BYTES] + [("bad-tensor", name) for name in sorted(bad_tensors())]
    jobs = [jobs[i] for i in np.random.default_rng(0).permutation(len(jobs))]
    port = server[0][0]
    local = threading.local()

    def run(job):
        if not hasattr(local, "client"):
            local.client = httpclient.InferenceServerClient(f"127.0.0.1:{port}")
        kind, key = job
        if kind == "bytes":
            inputs = [bytes_input(httpclient, [images[names[key]]])]
        elif kind == "tensor":
            inputs = [tensor_input(httpclient, pixels[key:key + 1])]
        elif kind == "bad":
            inputs = [bytes_input(httpclient, [bad_images(MAX_BODY)[key][0]])]
        else:
            inputs = make_inputs(httpclient, bad_tensors()[key][0])
        try:
            return local.client.infer(NAME, inputs)
        except InferenceServerException as e:
            return e

    stats_before = http.get_inference_statistics(NAME)["model_stats"][0]
    metrics_before = get(server[0][2], "/metrics")[1]
    # gRPC requests in flight at the same time, through the async API
    grpc_client = grpcclient.InferenceServerClient(f"127.0.0.1:{server[0][1]}")
    grpc_results, done = {}, threading.Event()

    def callback(i, result, error):
        grpc_results[i] = error if error is not None else result
        if len(grpc_results) == len(names):
            done.set()

    for i in range(len(names)):
        grpc_client.async_infer(NAME, [bytes_input(grpcclient, [images[names[i]]])],
                                callback=lambda result, error, i=i: callback(i, result, error))
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(run, jobs))
    assert done.wait(120) and len(grpc_results) == len(names)

    assert len(results) == len(jobs)
    for (kind, key), result in zip(jobs, results):
        if kind in ("bytes", "tensor"):
            assert not isinstance(result, Exception), (kind, key, result)
            check_outputs(result, reference[key:key + 1])
        else:
            assert isinstance(result, InferenceServerException) and result.status() == "400", (kind, key, result)
    for i, result in grpc_results.items():
        assert not isinstance(result, Exception), result
        check_outputs(result, reference[i:i + 1])

    stats = http.get_inference_statistics(NAME)["model_stats"][0]
    sizes = {b["batch_size"]: int(b["compute_infer"]["count"]) for b in stats["batch_stats"]}
    before = {b["batch_size"]: int(b["compute_infer"]["count"]) for b in stats_before["batch_stats"]}
    assert any(n > 1 and sizes[n] > before.get(n, 0) for n in sizes), sizes  # the dynamic batcher batched
    metrics = get(server[0][2], "/metrics")[1]
    forwards = {k: prometheus_samples(metrics, "fastmvit_forward_batch_size" + k)[f'model="{NAME}"'] -
                prometheus_samples(metrics_before, "fastmvit_forward_batch_size" + k)[f'model="{NAME}"']
                for k in ("_count", "_sum")}
    goods = sum(kind in ("bytes", "tensor") for kind, _ in jobs) + len(names)
    assert forwards["_sum"] == goods  # every good image ran once, no bad one reached the model
    assert forwards["_count"] < goods  # so some forwards ran several requests' images together
    rejected = (prometheus_samples(metrics, "fastmvit_rejected_requests_total")[f'model="{NAME}"'] -
                prometheus_samples(metrics_before, "fastmvit_rejected_requests_total").get(f'model="{NAME}"', 0.0))
    # ours: every bad encoded image, and of the bad tensors the NaN one and the one with both inputs (the
    # server core refuses wrong shapes, dtypes, batch sizes and unknown inputs itself)
    assert rejected == len(BAD_BYTES) + 2
    assert get(server[0][0], "/v2/health/ready")[0] == 200


def test_refuses_to_serve_through_a_stub_that_misreads_numpy_2(checkpoint, tmp_path):
    """The bundled stub was built against NumPy 1.x and sends NumPy 2 string arrays empty: with NumPy 2 in
    the stub's environment the model must fail to load, saying why, rather than serve wrong answers."""
    install = find_tritonserver()
    if install is None:
        pytest.skip("no tritonserver set up: run `bash .ci/setup_serving.sh`")
    if int(np.__version__.split(".")[0]) < 2:
        pytest.skip("this environment has NumPy 1: nothing to misread")
    write_model_repository(tmp_path / "repo", MODEL, checkpoint, kind="cpu", max_batch_size=1, input_size=64)
    env = install.env()
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env["PATH"]  # this environment's python3 first
    ports = [free_port() for _ in range(3)]
    proc = ServerProcess(install.command(str(tmp_path / "repo"), *ports), env=env,
                         log_path=str(tmp_path / "server.log"), name="tritonserver").start()
    try:
        proc.proc.wait(timeout=300)  # no model could load: the server gives up
    finally:
        proc.stop()
    assert proc.proc.returncode != 0
    log = proc.log_tail(200_000)
    assert "backend stubs built against NumPy 1.x" in log and "install numpy<2" in log
