"""A real LitServe server (`python -m fastmvit serve`) under faults, on the CPU: its model worker SIGKILLed under
concurrent load, an injected CUDA-like device error and out-of-memory errors (the FASTMVIT_SERVING_FAULTS
test hook), a full queue, a hung model, slow, idle and vanishing clients, and SIGTERM under load. Every
request must get an HTTP status (no connection error, no hang past the limits) and the server must serve
good requests again within a bounded time.

One server for the module (starting one costs tens of seconds on 2 cores); the SIGTERM test stops it and
runs last. Faults are triggered by files the test creates (see fastmvit/serving/faults.py)."""
import http.client
import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import pytest

from fastmvit.serving.faults import FAULTS_ENV
from fastmvit.serving.launch import ServerProcess

from .helpers import INPUT_SIZE, MODEL, assert_same_top_k, get, litserve_process, reference_logits

pytest.importorskip("litserve", reason="the serve extra (litserve) is not installed")

MAX_BATCH = 8
MAX_QUEUE = 8
BODY_TIMEOUT = 2.0
IDLE_TIMEOUT = 2.0
QUEUE_TIMEOUT = 10.0
INFERENCE_TIMEOUT = 5.0
DRAIN_TIMEOUT = 20.0
RECOVERY_LIMIT = 180.0  # seconds for a new worker to load and warm up on a busy 2-core machine


@dataclass
class Server:
    port: int
    proc: ServerProcess
    device_error: Path  # create it: the next forward raises a CUDA-like error
    hang: Path  # while it exists, forwards wait

    def worker_pids(self) -> List[int]:
        """The model worker processes (LitServe spawns them: `spawn_main` in the command line)."""
        pids = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                if os.getpgid(int(d.name)) != self.proc.proc.pid:
                    continue
                cmd = (d / "cmdline").read_bytes()
            except (OSError, ProcessLookupError):
                continue
            if b"spawn_main" in cmd:
                pids.append(int(d.name))
        return pids


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("litserve-faults")
    device_error, hang = root / "device-error", root / "hang"
    args = ["--model", MODEL, "--weights", checkpoint, "--host", "127.0.0.1", "--input-size", str(INPUT_SIZE),
            "--max-batch-size", str(MAX_BATCH), "--batch-timeout-ms", "50", "--log-level", "warning",
            "--body-timeout", str(BODY_TIMEOUT), "--idle-timeout", str(IDLE_TIMEOUT),
            "--queue-timeout", str(QUEUE_TIMEOUT), "--inference-timeout", str(INFERENCE_TIMEOUT),
            "--max-queue", str(MAX_QUEUE), "--drain-timeout", str(DRAIN_TIMEOUT)]
    faults = {FAULTS_ENV: f"oom_above=2,device_error_when={device_error},hang_when={hang}"}
    with litserve_process(args, root, env=faults) as (port, proc):
        try:
            yield Server(port, proc, device_error, hang)
        finally:
            hang.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def reference(checkpoint, images):
    return dict(zip(images, reference_logits(checkpoint, list(images.values()))))


@dataclass
class Outcome:
    status: Optional[int]  # None: no HTTP status came back
    error: Optional[str] = None  # the client-side exception, if any
    retry_after: Optional[str] = None
    body: object = None
    at: float = 0.0  # time.monotonic() when it ended


def send(port: int, body: bytes, timeout: float = 60.0) -> Outcome:
    """POST /predict; an Outcome either way (a connection error is recorded, not raised)."""
    import json

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/predict", body=body, headers={"Content-Type": "image/jpeg"})
        resp = conn.getresponse()
        raw = resp.read()
        try:
            parsed = json.loads(raw)
        except ValueError:
            parsed = raw.decode(errors="replace")
        return Outcome(resp.status, None, resp.getheader("Retry-After"), parsed, time.monotonic())
    except (OSError, http.client.HTTPException) as e:
        return Outcome(None, f"{type(e).__name__}: {e}", at=time.monotonic())
    finally:
        conn.close()


def wait_until_serving(port: int, body: bytes, limit: float = RECOVERY_LIMIT) -> float:
    """Seconds until a good request gets 200; fails the test after ``limit``."""
    start = time.monotonic()
    while time.monotonic() - start < limit:
        if send(port, body, timeout=30).status == 200:
            return time.monotonic() - start
        time.sleep(0.25)
    pytest.fail(f"no good answer within {limit:.0f} s")


def log(server: Server) -> str:
    return server.proc.log_tail(1_000_000)


def assert_statuses(outcomes: List[Outcome], allowed: Tuple[int, ...]):
    lost = [o for o in outcomes if o.status is None]
    assert not lost, f"{len(lost)} requests got no HTTP status, e.g. {lost[0].error}"
    assert {o.status for o in outcomes} <= set(allowed), sorted(o.status for o in outcomes)
    for o in outcomes:
        if o.status in (429, 503):
            assert o.retry_after is not None and int(o.retry_after) >= 1, o


# -------------------------------------------------------------------------------------------------

def test_out_of_memory_splits_the_batch(server, images, reference):
    """Every forward of more than 2 images runs out of memory (injected): batches of up to 8 are split and
    retried in halves, and every request is answered correctly."""
    names = list(images) + list(images)[:2]
    with ThreadPoolExecutor(len(names)) as pool:
        outcomes = list(pool.map(lambda n: send(server.port, images[n]), names))
    for name, o in zip(names, outcomes):
        assert o.status == 200, (name, o)
        assert_same_top_k(o.body, reference[name], 5)
    assert "out of memory on a batch of" in log(server)  # a batch of more than 2 formed and was split


def test_device_error_fails_its_batch_and_the_worker_is_replaced(server, images):
    """A CUDA-like error (illegal memory access) in a forward: that batch's requests get 503 with
    Retry-After, the poisoned worker exits and a new one serves within a bounded time."""
    body = images["noise.jpg"]
    assert send(server.port, body).status == 200
    before = server.worker_pids()
    server.device_error.touch()
    with ThreadPoolExecutor(4) as pool:
        outcomes = list(pool.map(lambda _: send(server.port, body), range(4)))
    assert_statuses(outcomes, (200, 503))
    assert any(o.status == 503 and "device error" in o.body["detail"] for o in outcomes), outcomes
    recovery = wait_until_serving(server.port, body)
    assert not server.device_error.exists()
    after = server.worker_pids()
    assert after and set(after).isdisjoint(before), (before, after)
    assert "device context is unusable" in log(server) and "restarted" in log(server)
    print(f"served again {recovery:.1f} s after the device error")


def test_sigkill_worker_under_load(server, images):
    """SIGKILL the model worker while 8 clients send requests: every request gets a status (200, or 503
    with Retry-After while the worker is replaced), /health turns 503 and back to 200, and good requests
    succeed again within a bounded time."""
    bodies = list(images.values())
    outcomes: List[Outcome] = []
    health: List[Tuple[float, Optional[int]]] = []
    stop = threading.Event()
    killed_at = []

    def client(i):
        while not stop.is_set():
            o = send(server.port, bodies[i % len(bodies)])
            outcomes.append(o)
            i += 1
            if o.status != 200:
                time.sleep(0.1)

    def watch_health():
        while not stop.is_set():
            health.append((time.monotonic(), get(server.port, "/health", timeout=10)[0]))
            time.sleep(0.2)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)] + [threading.Thread(target=watch_health)]
    for t in threads:
        t.start()
    try:
        time.sleep(2.0)
        (pid,) = server.worker_pids()
        os.kill(pid, signal.SIGKILL)
        killed_at.append(time.monotonic())
        deadline = killed_at[0] + RECOVERY_LIMIT
        while time.monotonic() < deadline:  # until clients see answers again after the restart
            if sum(o.status == 200 and o.at > killed_at[0] + 1 for o in outcomes) >= 8:
                break
            time.sleep(0.2)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    t0 = killed_at[0]
    assert_statuses(outcomes, (200, 503))
    after = [o for o in outcomes if o.at > t0]
    assert any(o.status == 503 for o in after), "the kill went unnoticed"
    recovered = [o.at for o in after if o.status == 200 and o.at > t0 + 1]
    assert len(recovered) >= 8, "the server did not serve again after the kill"
    codes = [s for t, s in health if t > t0]
    assert 503 in codes and codes[-1] == 200, codes
    assert health[-1][1] == 200
    print(f"{len(outcomes)} requests: {sum(o.status == 200 for o in outcomes)} x 200, "
          f"{sum(o.status == 503 for o in outcomes)} x 503; served again {recovered[0] - t0:.1f} s after the kill")


def test_full_queue_gets_429(server, images):
    """The model hangs: the first MAX_QUEUE requests are admitted and wait, the rest get 429 with
    Retry-After at once; when the model resumes every admitted request is answered 200."""
    body = images["gradient.jpg"]
    server.hang.touch()
    try:
        with ThreadPoolExecutor(MAX_QUEUE + 4) as pool:
            futures = [pool.submit(send, server.port, body) for _ in range(MAX_QUEUE + 4)]
            deadline = time.monotonic() + 20
            while sum(f.done() for f in futures) < 4 and time.monotonic() < deadline:
                time.sleep(0.05)
            early = [f.result() for f in futures if f.done()]
            server.hang.unlink()
            outcomes = [f.result() for f in futures]
    finally:
        server.hang.unlink(missing_ok=True)
    assert [o.status for o in early] == [429] * 4, early
    assert_statuses(outcomes, (200, 429))
    assert sorted(o.status for o in outcomes) == [200] * MAX_QUEUE + [429] * 4
    assert all("limit" in o.body["detail"] for o in outcomes if o.status == 429)


def test_hung_model_gets_504(server, images):
    """A forward that does not finish: its request gets 504 after the inference time limit, and once
    the model resumes the server answers again."""
    body = images["tall.png"]
    server.hang.touch()
    try:
        start = time.monotonic()
        o = send(server.port, body)
        elapsed = time.monotonic() - start
    finally:
        server.hang.unlink(missing_ok=True)
    assert o.status == 504 and "did not answer within" in o.body["detail"], o
    assert INFERENCE_TIMEOUT <= elapsed < INFERENCE_TIMEOUT + 10
    assert send(server.port, body).status == 200


def read_reply(s: socket.socket) -> bytes:
    """One whole HTTP reply from ``s``: the head and a Content-Length body can arrive in separate reads."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(4096)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), None)
    while length is not None and len(body) < length:
        chunk = s.recv(4096)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


def test_slow_body_gets_408_and_blocks_nobody(server, images):
    """A client that sends its body slower than the body time limit gets 408; a good request meanwhile
    is answered."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: 5000\r\n\r\n")
        s.sendall(b"\xff\xd8" + b"x" * 100)
        assert send(server.port, images["grey.png"]).status == 200
        start = time.monotonic()
        reply = read_reply(s)
        assert reply.startswith(b"HTTP/1.1 408"), reply
        assert b"did not arrive within" in reply, reply
        assert time.monotonic() - start < BODY_TIMEOUT + 5


def test_idle_and_slow_header_connections_are_closed(server, images):
    """Silent connections and one sending its request head a byte at a time are closed with 408 after
    the idle limit; good requests are answered meanwhile."""
    socks = [socket.create_connection(("127.0.0.1", server.port), timeout=30) for _ in range(40)]
    try:
        socks[0].sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\n")  # and never the end of the head
        assert send(server.port, images["stripes.png"]).status == 200
        replies = [s.recv(4096) for s in socks]
    finally:
        for s in socks:
            s.close()
    assert all(r.startswith(b"HTTP/1.1 408") for r in replies), {r[:40] for r in replies}


def test_vanishing_clients_give_back_their_places(server, images):
    """Clients that send a request and close the connection before the answer: the server stays up and
    their queue places are given back (MAX_QUEUE concurrent requests afterwards all get 200, no 429)."""
    body = images["rgba.png"]
    for _ in range(3 * MAX_QUEUE):
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
            s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                      b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    time.sleep(5)  # let the abandoned requests finish
    with ThreadPoolExecutor(MAX_QUEUE) as pool:
        outcomes = list(pool.map(lambda _: send(server.port, body), range(MAX_QUEUE)))
    assert [o.status for o in outcomes] == [200] * MAX_QUEUE, outcomes


def test_sigterm_under_load_drains_and_exits_0(server, images):
    """SIGTERM to the whole process group (as `kill -TERM -PGID` or systemd does) while requests are in
    flight: the admitted requests are answered 200, new connections are refused, and the server exits 0.
    Runs last: it stops the module's server."""
    body = images["noise.jpg"]
    server.hang.touch()  # hold the requests in flight
    try:
        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(send, server.port, body) for _ in range(6)]
            time.sleep(1.5)
            os.killpg(server.proc.proc.pid, signal.SIGTERM)
            time.sleep(1.5)
            late = send(server.port, body, timeout=10)  # after the signal: refused, or 503 if it got in
            server.hang.unlink()
            outcomes = [f.result() for f in futures]
        code = server.proc.proc.wait(timeout=DRAIN_TIMEOUT + 30)
    finally:
        server.hang.unlink(missing_ok=True)
    assert [o.status for o in outcomes] == [200] * 6, outcomes
    assert late.status == 503 or "ConnectionRefused" in (late.error or ""), late
    assert code == 0, log(server)[-3000:]
    assert "shut down" in log(server)
