"""A real tritonserver (nvidia-pytriton's binary) serving fastmvit under faults, on the CPU: a hung instance,
a full queue, an injected CUDA-like device error and a SIGKILLed Python-backend stub under concurrent load.
Triton restarts no stub and keeps /v2/health/ready at 200 (issues 8604 and 7230), so what is checked is
what the server allows: every request gets a status (no hang past the queue limit), and the failure is
visible to ``python -m fastmvit.serving.probe``.

One server, two copies of the model (each its own stub process): ``steady`` takes the SIGKILL, ``faulty``
the hang and the device error (FASTMVIT_SERVING_FAULTS file triggers, see fastmvit/serving/faults.py)."""
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import List

import numpy as np
import pytest

from fastmvit.serving.faults import FAULTS_ENV
from fastmvit.serving.launch import ServerProcess, default_install_dir, find_tritonserver, free_port, http_status
from fastmvit.serving.triton import write_model_repository

from .helpers import INPUT_SIZE, MODEL

httpclient = pytest.importorskip("tritonclient.http", reason="the serve extra (tritonclient[http]) is not installed")
from tritonclient.utils import InferenceServerException  # noqa: E402

QUEUE_TIMEOUT = 3.0
MAX_QUEUE = 3


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    install = find_tritonserver()
    if install is None:
        pytest.skip(f"no tritonserver set up at {default_install_dir()}: run `bash .ci/setup_serving.sh`")
    root = tmp_path_factory.mktemp("triton-faults")
    for name in ("steady", "faulty"):
        write_model_repository(root / "repo", MODEL, checkpoint, name=name, kind="cpu", max_batch_size=4,
                               batch_sizes=[1, 4], input_size=INPUT_SIZE, max_queue_delay_us=20_000,
                               queue_timeout_s=QUEUE_TIMEOUT, max_queue_size=MAX_QUEUE)
    ports = [free_port() for _ in range(3)]
    env = install.env()
    env["OMP_NUM_THREADS"] = "1"  # see test_litserve_faults.py
    env[FAULTS_ENV] = f"hang_when={root / 'hang'},device_error_when={root / 'device-error'}"
    proc = ServerProcess(install.command(str(root / "repo"), *ports), env=env, log_path=str(root / "server.log"),
                         name="tritonserver").start()
    try:
        proc.wait_ready(f"http://127.0.0.1:{ports[0]}/v2/health/ready", timeout=300)
        yield ports[0], proc, root
    finally:
        (root / "hang").unlink(missing_ok=True)
        proc.stop()


def pixels(n=1):
    return np.full((n, 3, INPUT_SIZE, INPUT_SIZE), 0.5, np.float32)


def infer(port, model, timeout=60.0):
    """The HTTP status of one inference (200, or the error's), or the client-side exception's name."""
    client = httpclient.InferenceServerClient(f"127.0.0.1:{port}", network_timeout=timeout,
                                              connection_timeout=timeout)
    x = httpclient.InferInput("image", [1, 3, INPUT_SIZE, INPUT_SIZE], "FP32")
    x.set_data_from_numpy(pixels())
    try:
        client.infer(model, [x])
        return 200, ""
    except InferenceServerException as e:
        return (int(e.status()) if (e.status() or "").isdigit() else e.status()), e.message()
    except Exception as e:  # noqa: BLE001 - a connection error or a timeout: what must not happen
        return type(e).__name__, str(e)
    finally:
        client.close()


def probe(port, model):
    return subprocess.run([sys.executable, "-m", "fastmvit.serving.probe", "triton", "--url", f"127.0.0.1:{port}",
                           "--model", model, "--timeout", "20"], capture_output=True, text=True, timeout=120)


def test_hung_instance_and_full_queue_answer_each_request(server):
    """The instance hangs in a forward: requests queued behind it are rejected after the queue time limit,
    those beyond the queue bound at once; none waits forever. When it resumes, it serves again."""
    port, _, root = server
    hang = root / "hang"
    hang.touch()
    try:
        with ThreadPoolExecutor(8) as pool:
            first = pool.submit(infer, port, "faulty")
            time.sleep(1.0)  # the first request is inside the hung forward
            start = time.monotonic()
            rest = [pool.submit(lambda: (infer(port, "faulty"), time.monotonic() - start)) for _ in range(MAX_QUEUE + 3)]
            rest = [f.result() for f in rest]
            hang.unlink()
            first = first.result()
    finally:
        hang.unlink(missing_ok=True)
    assert first == (200, ""), first
    codes = [r[0][0] for r in rest]
    assert all(isinstance(c, int) for c in codes), rest  # every request got an HTTP status
    assert all(c >= 400 for c in codes), rest
    assert max(t for _, t in rest) < QUEUE_TIMEOUT + 10, rest
    messages = " ".join(r[0][1] for r in rest).lower()
    assert "timeout" in messages and "queue size" in messages, rest
    assert infer(port, "faulty") == (200, "")


def test_device_error_answers_503_and_the_probe_sees_it(server):
    """A CUDA-like error (injected): the requests of that batch and every later one get 503 saying the
    instance cannot serve, Triton's own readiness stays 200 (the upstream limitation), and the probe
    reports the model not ready."""
    port, _, root = server
    assert probe(port, "faulty").returncode == 0
    (root / "device-error").touch()
    with ThreadPoolExecutor(3) as pool:
        outcomes = list(pool.map(lambda _: infer(port, "faulty"), range(3)))
    assert [o[0] for o in outcomes] == [503] * 3 and all("device error" in m for _, m in outcomes), outcomes
    assert infer(port, "faulty")[1].endswith("cannot serve any more; restart the server")
    result = probe(port, "faulty")
    assert result.returncode == 1 and "503" in result.stderr and "device error" in result.stderr
    print(f"after the device error: /v2/models/faulty/ready -> {http_status(f'http://127.0.0.1:{port}/v2/models/faulty/ready')}")
    assert infer(port, "steady") == (200, "")  # the other model's instance is unaffected


def stub_pids(proc: ServerProcess, model: str) -> List[int]:
    out = subprocess.run(["pgrep", "-g", str(proc.proc.pid), "-f", "triton_python_backend_stub"],
                         capture_output=True, text=True).stdout.split()
    return [int(p) for p in out if f"/{model}/1/model.py" in Path(f"/proc/{p}/cmdline").read_bytes().decode(
        errors="replace").replace("\0", " ")]


def test_sigkill_stub_under_load_every_request_answered_and_probe_fails(server):
    """SIGKILL the Python-backend stub while 6 clients send requests: every request gets an HTTP status
    (200 before, 5xx after; no connection error, no hang), and the probe reports the model not ready
    although Triton's /v2/health/ready still answers 200."""
    port, proc, _ = server
    (pid,) = stub_pids(proc, "steady")
    outcomes, stop, killed = [], threading.Event(), []

    def client():
        while not stop.is_set():
            outcomes.append((infer(port, "steady"), time.monotonic()))

    threads = [threading.Thread(target=client) for _ in range(6)]
    for t in threads:
        t.start()
    try:
        time.sleep(2.0)
        os.kill(pid, signal.SIGKILL)
        killed.append(time.monotonic())
        time.sleep(4.0)
    finally:
        stop.set()
        for t in threads:
            t.join(90)
    assert not any(t.is_alive() for t in threads), "a request hung"
    codes = [o[0][0] for o in outcomes]
    assert all(isinstance(c, int) for c in codes), [o for o in outcomes if not isinstance(o[0][0], int)][:3]
    assert 200 in codes
    after = [o for o, at in outcomes if at > killed[0] + 1.0]
    assert after and all(c >= 500 for c, _ in after), after[:3]
    result = probe(port, "steady")
    assert result.returncode == 1 and "not healthy" in result.stderr, result.stderr
    print(f"{len(codes)} requests: {codes.count(200)} x 200, then {sorted(set(codes) - {200})}; "
          f"/v2/health/ready -> {http_status(f'http://127.0.0.1:{port}/v2/health/ready')}")
