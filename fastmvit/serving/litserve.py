"""LitServe plug-in: ``FastMViTAPI`` (a ``litserve.LitAPI``) and ``serve()``, behind
``python -m fastmvit serve --model s [--weights PATH]``.

    curl --data-binary @cat.jpg http://127.0.0.1:8000/predict
    [{"label": "tabby, tabby cat", "score": 0.62}, ...]

``POST /predict`` takes one image per request, in one of three forms:
  - the encoded image as the body (JPEG, PNG, WebP, ...; any Content-Type but the two below), as the
    hosted Hugging Face inference API takes it; ``?top_k=N`` sets how many classes come back;
  - ``application/json``: ``{"inputs": "<base64 image>", "parameters": {"top_k": N}}``;
  - ``application/x-npy``: one preprocessed image, float32 ``[3, S, S]`` in [0, 1] (``numpy.save``).
Each request is read, validated and decoded in the HTTP process before it is queued, so a bad one gets
its own 4xx (400 malformed, 413 too large, 415 not an image, 422 unusable) and never reaches a batch:
in LitServe's batched loop an exception from any one request fails every request of its batch.
``GET /health`` is 200 only once the worker has loaded the model and run every batch size;
``GET /metrics`` has the Prometheus metrics.

A segmentation model (``--model deeplabv3-<variant>``) sees the whole image, its shorter side resized to
the input size, and answers its mask at the image's own size (a ``.npy`` tensor ``[3, H, W]``: at H x W):
    {"width": W, "height": H, "mask": "<base64 PNG>", "classes": [{"label", "index", "share"}, ...],
     "labels": [every class name, by index]}
where the PNG's pixel values are class indices (an 8-bit palette PNG in PASCAL VOC colours; 16-bit grey
above 256 classes) and ``classes`` are those present, largest share of pixels first. With
``Accept: image/png`` the answer is the bare PNG. Requests of equal input shape run in one forward.

Faults (``ServingLimits`` in ``fastmvit.serving.faults`` sets the limits):
  - a model worker that dies (killed, out of host memory, a CUDA fault) is restarted with a bounded
    back-off; the requests it held get 503 with Retry-After at once, ``/health`` is 503 until the new
    worker has loaded and warmed up, and requests arriving meanwhile get 503 with Retry-After;
  - a forward that fails answers that batch's requests only: out of memory splits the batch and retries
    the halves, a device fault answers 503 and replaces the worker (its CUDA context is poisoned),
    anything else answers 500;
  - a body slower than ``body_timeout`` gets 408, a request not taken by the model within
    ``queue_timeout`` 503, one not answered within ``inference_timeout`` after that 504; more than
    ``max_queue`` admitted requests get 429; idle connections are closed after ``idle_timeout``;
  - SIGTERM (or Ctrl+C): stop accepting connections, finish the admitted requests within
    ``drain_timeout`` (the rest get 503), stop the workers, exit 0.
"""
# No `from __future__ import annotations` here: LitServe hands decode_request's annotation to FastAPI,
# which must see the real Annotated[..., Depends(...)] object, not a string.
import asyncio
import base64
import binascii
import contextlib
import json
import logging
import multiprocessing as mp
import multiprocessing.connection
import os
import signal
import socket
import threading
import time
from typing import Annotated, Dict, List, Optional, Sequence, Tuple, Union

import anyio
import litserve as ls
import numpy as np
import torch
from fastapi import Depends, HTTPException, Request
from litserve.loops.base import _SENTINEL_VALUE
from litserve.loops.simple_loops import BatchedLoop
from litserve.utils import LitAPIStatus, WorkerSetupStatus
from starlette.responses import JSONResponse, Response

from .common import Classifier, ImageDecoder, InputLimits, RequestError, Segmenter, default_batch_sizes
from .faults import InjectedFaults, Refusal, ServingLimits, forward_with_retries, refusal_for
from .metrics import RequestMetricsMiddleware, ServerMetrics

__all__ = ["FastMViTAPI", "ResilientLitServer", "build_server", "serve"]

logger = logging.getLogger("fastmvit.serving")

# ResilientLitServer builds on these LitServe 0.2 internals; say so plainly if a release drops one
for _name in ("_start_server", "_start_worker_monitoring", "_perform_graceful_shutdown",
              "launch_single_inference_worker"):
    if not hasattr(ls.LitServer, _name):
        raise ImportError(f"fastmvit's LitServe plug-in needs litserve>=0.2.19,<0.3 (LitServer.{_name} is "
                          f"missing in litserve {ls.__version__})")

NPY_TYPES = ("application/x-npy", "application/npy")

# What the HTTP process hands the worker for one request: (pixels [3, S, S] float32, top_k) for a classifier,
# (pixels [3, h, w] float32, ((H, W) of the mask, PNG answer?)) for a segmentation model. Plain tuples of a
# NumPy array and ints: they cross LitServe's multiprocessing queues with plain pickle.
Payload = Tuple[np.ndarray, object]


def wants_png(accept: Optional[str]) -> bool:
    """Whether an ``Accept`` header prefers ``image/png`` to JSON (by q-value; JSON on a tie or none)."""
    best = {"png": 0.0, "json": 0.0}
    for part in (accept or "").split(","):
        kind, *params = [p.strip().lower() for p in part.split(";")]
        q = 1.0
        for p in params:
            if p.startswith("q="):
                try:
                    q = float(p[2:])
                except ValueError:
                    q = 0.0
        for key, names in (("png", ("image/png", "image/*")), ("json", ("application/json", "application/*", "*/*"))):
            if kind in names:
                best[key] = max(best[key], q)
    return best["png"] > best["json"]


async def _payload(request: Request) -> Payload:
    """FastAPI dependency of the predict route; runs in the HTTP process."""
    return await request.app.state.fastmvit_api.read_request(request)


class FastMViTAPI(ls.LitAPI):
    """Serve a fastmvit classifier, or segmentation model (masks: see the module docstring), with LitServe's
    dynamic batching.

    Args:
        model, weights, pretrained: as ``fastmvit.load``.
        device, dtype: where and in what the model runs; LitServe picks the device per worker, dtype
            "auto" is float16 on a GPU and float32 on the CPU (requests and answers are float32 anyway).
        input_size: serve at this square size instead of the checkpoint's.
        max_batch_size, batch_timeout: LitServe's batching: the most requests per forward, and how long
            (seconds) the worker waits for a batch to fill.
        batch_sizes: the sizes warmed up before ``/health`` turns ready (default 1, 2, 4, ... max).
        top_k: classes returned when a request does not say.
        limits: body size, image pixels and smallest side accepted.
        serving_limits: time limits, queue bound, drain and restart policy (``ServingLimits``).
    """

    def __init__(self, model: str = "s", weights=None, *, pretrained: Union[bool, str] = True,
                 device: Optional[str] = None, dtype: Optional[str] = None, input_size: Optional[int] = None,
                 max_batch_size: int = 16, batch_timeout: float = 0.005, batch_sizes: Optional[Sequence[int]] = None,
                 top_k: int = 5, limits: InputLimits = InputLimits(), api_path: str = "/predict",
                 serving_limits: ServingLimits = ServingLimits()):
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout, api_path=api_path,
                         loop=_WorkerLoop())
        self.serving_limits = serving_limits
        self.exit_code: Optional[int] = None  # worker process: set when it must be replaced (see _WorkerLoop)
        self.model_name, self.weights, self.pretrained = model, weights, pretrained
        self.device_override, self.dtype, self.input_size = device, dtype, input_size
        self.batch_sizes = tuple(batch_sizes or default_batch_sizes(max_batch_size))
        self.default_top_k, self.limits = top_k, limits
        self.metrics = ServerMetrics(max_batch_size)
        self.decoder: Optional[ImageDecoder] = None  # HTTP process: set by prepare()
        self.num_classes: Optional[int] = None
        self.task = "classification"  # or "segmentation": set by prepare() (HTTP process) and setup() (worker)
        self.classifier: Optional[Classifier] = None  # worker process: set by setup()
        self._slots = None  # HTTP process: made on first use, in that process's event loop

    # --- HTTP process -----------------------------------------------------------------------------
    def prepare(self) -> None:
        """Learn the input size, preprocessing and classes of the weights (a load on the CPU), so the HTTP
        process can check and decode requests. ``build_server`` calls it."""
        c = Classifier.load(self.model_name, self.weights, pretrained=self.pretrained, device="cpu",
                            dtype="float32", input_size=self.input_size, limits=self.limits)
        self.decoder, self.num_classes, self.task = c.decoder, c.num_classes, c.task
        if self.task == "classification" and not 1 <= self.default_top_k <= self.num_classes:
            raise ValueError(f"top_k must lie in 1..{self.num_classes}, got {self.default_top_k}")

    async def read_request(self, request: Request) -> Payload:
        start = time.perf_counter()
        guard = _Guard.of(request.app)
        try:
            body = await self._read_body(request)
            guard.admit(request.scope)  # after the body: a slow client holds a connection, not a queue place
            kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
            top_k = request.query_params.get("top_k")
            if kind == "application/json":
                body, top_k = self._from_json(body, top_k)
            elif kind.startswith("multipart/"):
                raise RequestError(415, "multipart forms are not read: send the image itself as the body "
                                        "(curl --data-binary @image.jpg)")
            if self.task == "segmentation":  # no top_k: every pixel gets its class
                options = wants_png(request.headers.get("accept"))
            else:
                options = self._top_k(top_k)
            if kind in NPY_TYPES:
                pixels = self.decoder.read_npy(body)
                size = pixels.shape[1:]
            else:
                pixels = await anyio.to_thread.run_sync(self.decoder.decode, body, limiter=self._decode_slots())
                if self.task == "segmentation":
                    pixels, size = pixels
        except RequestError as e:
            headers = {"Retry-After": str(self.serving_limits.retry_after)} if e.status in (429, 503) else None
            raise HTTPException(status_code=e.status, detail=e.message, headers=headers) from None
        self.metrics.decode(time.perf_counter() - start)
        if self.task == "segmentation":
            return pixels, ((int(size[0]), int(size[1])), options)
        return pixels, options

    def _decode_slots(self) -> "anyio.CapacityLimiter":
        """At most a few decodes at once per HTTP process: a large image takes ~100 MB while decoding,
        and more threads than cores would not decode faster."""
        if getattr(self, "_slots", None) is None:
            self._slots = anyio.CapacityLimiter(max(2, os.cpu_count() or 1))
        return self._slots

    async def _read_body(self, request: Request) -> bytes:
        limit = self.limits.max_bytes
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise RequestError(400, "invalid Content-Length header")
            if int(declared) > limit:
                raise RequestError(413, f"a body of {declared} bytes exceeds the limit of {limit} bytes")
        chunks, size = [], 0
        seconds = self.serving_limits.body_timeout
        try:
            with anyio.fail_after(seconds):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit:
                        raise RequestError(413, f"the body exceeds the limit of {limit} bytes")
                    chunks.append(chunk)
        except TimeoutError:
            raise RequestError(408, f"the request body did not arrive within {seconds:g} s") from None
        if size == 0:
            raise RequestError(400, "empty request body: send an encoded image (JPEG, PNG, WebP, ...)")
        return b"".join(chunks)

    @staticmethod
    def _from_json(body: bytes, top_k):
        try:
            doc = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise RequestError(400, "the body is not valid JSON") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), str):
            raise RequestError(400, 'expected JSON {"inputs": "<base64-encoded image>", "parameters": {...}}')
        params = doc.get("parameters") or {}
        if not isinstance(params, dict):
            raise RequestError(400, '"parameters" must be a JSON object')
        try:
            data = base64.b64decode(doc["inputs"], validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(400, '"inputs" is not valid base64') from None
        return data, params.get("top_k", top_k)

    def _top_k(self, value) -> int:
        if value is None:
            return self.default_top_k
        try:
            k = int(value)
        except (TypeError, ValueError):
            raise RequestError(422, f"top_k must be an integer in 1..{self.num_classes}") from None
        if isinstance(value, float) or not 1 <= k <= self.num_classes:
            raise RequestError(422, f"top_k must be an integer in 1..{self.num_classes}")
        return k

    # --- worker process -----------------------------------------------------------------------------
    def setup(self, device) -> None:
        # The server process stops this worker when it has drained (a queue sentinel); a SIGTERM or Ctrl+C
        # sent to the whole process group must not kill it while requests are still being finished.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        self.classifier = Classifier.load(
            self.model_name, self.weights, pretrained=self.pretrained, device=self.device_override or device,
            dtype=self.dtype, input_size=self.input_size, limits=self.limits, batch_sizes=self.batch_sizes)
        self.task = self.classifier.task
        self.metrics.warmup(self.classifier.warmup())
        self._forward = lambda images: self.classifier.forward(images)
        faults = InjectedFaults.from_env()
        if faults is not None:
            self._forward = faults.wrap(self._forward)

    def decode_request(self, request: Annotated[tuple, Depends(_payload)]) -> Payload:
        return request  # read, checked and decoded in the HTTP process already

    def batch(self, inputs):
        if self.task == "segmentation":
            return list(inputs)  # shapes differ: predict() groups them
        return np.stack([pixels for pixels, _ in inputs]), [k for _, k in inputs]

    def predict(self, x):
        """One answer per request: its top-k (or mask), or a ``Refusal`` when the forward failed for it. A
        failure never escapes: LitServe would fail the whole batch with an opaque 500."""
        if self.task == "segmentation":
            return self._refuse_failures(self._segment(x))
        images, ks = x
        start = time.perf_counter()
        rows = forward_with_retries(self._forward, torch.from_numpy(images), release=self._release)
        self.metrics.batch(len(ks), time.perf_counter() - start)
        good = [i for i, r in enumerate(rows) if isinstance(r, torch.Tensor)]
        out: List[object] = list(rows)
        if good:
            tops = self.classifier.top_k(torch.stack([rows[i] for i in good]), max(ks[i] for i in good))
            for i, top in zip(good, tops):
                out[i] = [{"label": t["label"], "score": t["score"]} for t in top[: ks[i]]]
        return self._refuse_failures(out)

    def _segment(self, inputs: List[Payload]) -> List[object]:
        """One forward per input shape (whole images of one aspect ratio share it), then each request's mask
        at its own size: the PNG bytes, or the JSON answer. An exception in place of an answer that failed."""
        seg: Segmenter = self.classifier
        groups: Dict[tuple, List[int]] = {}
        for i, (pixels, _) in enumerate(inputs):
            groups.setdefault(pixels.shape, []).append(i)
        out: List[object] = [None] * len(inputs)
        for idx in groups.values():
            start = time.perf_counter()
            images = torch.from_numpy(np.stack([inputs[i][0] for i in idx]))
            rows = forward_with_retries(self._forward, images, release=self._release)
            self.metrics.batch(len(idx), time.perf_counter() - start)
            for i, row in zip(idx, rows):
                if isinstance(row, BaseException):
                    out[i] = row
                    continue
                (height, width), png = inputs[i][1]
                try:
                    mask, classes = seg.answer(row, (height, width))
                except Exception as e:  # noqa: BLE001 - e.g. out of memory resizing a huge mask: this request only
                    out[i] = e
                    continue
                out[i] = mask if png else {"width": width, "height": height,
                                           "mask": base64.b64encode(mask).decode("ascii"),
                                           "classes": classes, "labels": seg.labels}
        return out

    def _refuse_failures(self, out: List[object]) -> List[object]:
        """Each exception in ``out`` logged once and replaced by its ``Refusal``."""
        failures = {id(r): r for r in out if isinstance(r, BaseException)}
        for e in failures.values():
            logger.error("forward failed for %d of %d requests", sum(r is e for r in out), len(out),
                         exc_info=(type(e), e, e.__traceback__))
        for i, r in enumerate(out):
            if isinstance(r, BaseException):
                out[i] = refusal_for(r)
                if out[i].fatal and self.exit_code is None:
                    logger.error("the device context is unusable: this worker exits after answering its batch, "
                                 "and the server starts a new one")
                    self.exit_code = 3
        return out

    def _release(self) -> None:
        if self.classifier.device.type == "cuda":
            torch.cuda.empty_cache()

    def unbatch(self, output):
        return output

    def encode_response(self, output):
        if isinstance(output, Refusal):
            headers = {"Retry-After": str(self.serving_limits.retry_after)} if output.retry else None
            return JSONResponse({"detail": output.message}, status_code=output.status, headers=headers)
        if isinstance(output, bytes):
            return Response(output, media_type="image/png")
        return output


class _WorkerLoop(BatchedLoop):
    """LitServe's batched loop, plus: a worker whose device context is poisoned exits before it takes
    another request (after the answers of its last batch were sent), so the server replaces it."""

    def get_batch_requests(self, lit_api, request_queue, transport):
        code = getattr(lit_api, "exit_code", None)
        if code is not None:
            logging.shutdown()
            os._exit(code)
        return super().get_batch_requests(lit_api, request_queue, transport)


class _Guard:
    """Per HTTP process: admission (429 when ``max_queue`` requests are in, 503 while no worker is ready or
    the server is draining) and a watchdog over the requests waiting for a worker, which answers each of
    them within its limits: 503 when its worker died or it waited ``queue_timeout`` for one, 504 after
    ``inference_timeout`` on the worker, 503 at the drain deadline. It only sets LitServe's per-request
    response slot, as LitServe's own worker monitor does."""

    TICK = 0.05  # seconds between checks; also the delay before a dead worker's requests are answered

    def __init__(self, server: "ResilientLitServer"):
        self.server = server
        self.limits: ServingLimits = server.serving_limits
        self.endpoint = server.api_endpoint
        self.admitted = 0
        self.status: Dict[str, str] = {}
        self.status_at = 0.0
        self.seen: Dict[str, List[Optional[float]]] = {}  # uid -> [first seen, taken by a worker at]
        self.task: Optional[asyncio.Task] = None

    @staticmethod
    def of(app) -> "_Guard":
        if getattr(app.state, "fastmvit_server", None) is None:
            return _NO_GUARD  # FastMViTAPI under a plain LitServer: LitServe's own behaviour
        guard = getattr(app.state, "fastmvit_guard", None)
        if guard is None or guard.pid != os.getpid():  # made in this (forked) HTTP process, on first use
            guard = app.state.fastmvit_guard = _Guard(app.state.fastmvit_server)
            guard.pid = os.getpid()
            guard.task = asyncio.get_running_loop().create_task(guard.watch(), name="fastmvit-guard")
            guard.refresh_status()
        return guard

    def refresh_status(self) -> None:
        try:
            self.status = dict(self.server.workers_setup_status.copy())
        except Exception:  # noqa: BLE001 - the manager is gone: the server is stopping
            self.status = {}
        self.status_at = time.monotonic()

    def any_ready(self) -> bool:
        return any(v == WorkerSetupStatus.READY for v in self.status.values())

    def admit(self, scope) -> None:
        retry = self.limits.retry_after
        if self.server.draining():
            raise RequestError(503, "the server is shutting down; retry on another instance")
        if not self.any_ready():
            raise RequestError(503, f"no model worker is ready (starting or restarting); retry in {retry} s")
        if self.admitted >= self.limits.max_queue:
            raise RequestError(429, f"the server holds {self.admitted} requests, its limit; retry in {retry} s")
        self.admitted += 1
        scope["fastmvit.admitted"] = self

    def release(self) -> None:
        self.admitted -= 1

    async def watch(self) -> None:
        while True:
            await asyncio.sleep(self.TICK)
            try:
                if time.monotonic() - self.status_at >= 2 * self.TICK:
                    await asyncio.to_thread(self.refresh_status)  # a manager round trip: off the event loop
                self.check(time.monotonic())
            except Exception:  # noqa: BLE001 - the watchdog must outlive any one bad tick
                logger.exception("fastmvit request watchdog")

    def check(self, now: float) -> None:
        limits, buffer = self.limits, self.server.response_buffer
        drain_over = self.server.draining() and now >= self.server.drain_deadline.value
        for uid in [u for u in self.seen if u not in buffer]:
            del self.seen[uid]
        for uid, item in list(buffer.items()):
            if item.event.is_set():
                continue
            times = self.seen.setdefault(uid, [now, None])
            worker = item.worker_id
            if worker is not None and times[1] is None:
                times[1] = now
            if drain_over:
                self.fail(item, 503, "the server is shutting down and could not finish this request in time; "
                                     "retry on another instance", retry=True)
            elif worker is not None and self.status.get(f"{self.endpoint}_{worker}") != WorkerSetupStatus.READY:
                self.fail(item, 503, "the model worker stopped while running this request and is being "
                                     f"restarted; retry in {limits.retry_after} s", retry=True)
            elif worker is None and now - times[0] > limits.queue_timeout:
                self.fail(item, 503, f"no model worker took this request within {limits.queue_timeout:g} s "
                                     "(overloaded or restarting); retry later", retry=True)
            elif worker is not None and now - times[1] > limits.inference_timeout:
                self.fail(item, 504, f"the model did not answer within {limits.inference_timeout:g} s")

    def fail(self, item, status: int, detail: str, retry: bool = False) -> None:
        headers = {"Retry-After": str(self.limits.retry_after)} if retry else None
        item.response = (HTTPException(status, detail, headers=headers), LitAPIStatus.ERROR)
        item.event.set()


class _NoGuard:
    def admit(self, scope) -> None:
        pass


_NO_GUARD = _NoGuard()


class _AdmissionMiddleware:
    """Gives back a request's queue place (``_Guard.admit``) when its response is done, whatever happened."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        try:
            await self.app(scope, receive, send)
        finally:
            guard = scope.get("fastmvit.admitted")
            if guard is not None:
                guard.release()


class ResilientLitServer(ls.LitServer):
    """A ``LitServer`` that survives its workers: replaces a dead one with a bounded back-off (LitServe's own
    ``restart_workers`` restarts at once, forever, and fails the dead worker's requests only when the HTTP
    server runs in the main process), answers every request within ``ServingLimits`` (``_Guard``), and
    drains on shutdown instead of dropping what it holds.

    Built on LitServe 0.2's internals (the worker monitor, the shutdown and the response buffer); the serve
    extra pins litserve below 0.3 for that reason, and ``tests/serving/test_litserve_faults.py`` checks
    the behaviour against the real server.
    """

    def __init__(self, api: FastMViTAPI, **kwargs):
        self.serving_limits: ServingLimits = api.serving_limits
        # LitServe drops a request that waited longer than its timeout when a worker takes it (504); ours
        # answers it 503 first (the watchdog), so the worker skips it instead of running it for nobody.
        super().__init__(api, timeout=self.serving_limits.queue_timeout, restart_workers=True, **kwargs)
        self.api_endpoint = api.api_path.split("/")[-1]
        self.drain_deadline = mp.Value("d", 0.0)  # shared with the forked HTTP processes; 0: not draining
        self.uvicorn_graceful_timeout = self.serving_limits.drain_timeout + 2
        self._listen_sockets = []
        self._stopping = threading.Event()
        self.app.state.fastmvit_server = self
        self.app.add_middleware(_AdmissionMiddleware)

    def draining(self) -> bool:
        return self.drain_deadline.value > 0

    def request_shutdown(self) -> None:
        """Begin the graceful shutdown (what SIGTERM does). Safe to call from a signal handler: the manager
        call runs in a thread of its own."""
        if self._shutdown_event is None:
            raise KeyboardInterrupt  # still starting: nothing to drain
        threading.Thread(target=self._shutdown_event.set, daemon=True).start()

    def _start_server(self, port, num_uvicorn_servers, log_level, sockets, uvicorn_worker_type, **kwargs):
        self._listen_sockets = list(sockets)  # closed in this process at shutdown, so the port stops accepting
        return super()._start_server(port, num_uvicorn_servers, log_level, sockets, uvicorn_worker_type, **kwargs)

    def _start_worker_monitoring(self, manager, uvicorn_workers):
        threading.Thread(target=self._monitor, daemon=True, name="fastmvit-worker-monitor").start()

    def _monitor(self) -> None:
        """Replace dead workers: the first death of a stable worker at once, repeated deaths with a growing
        delay. Its requests are answered by the HTTP processes' watchdogs as soon as its status leaves READY."""
        limits, api = self.serving_limits, self.litapi_connector.lit_apis[0]
        failures = [0] * len(self.inference_workers)
        ready_since: Dict[int, float] = {}
        start_at: Dict[int, float] = {}
        while not self._stopping.is_set() and not self._shutdown_event.is_set():
            try:
                alive = [p.sentinel for p in self.inference_workers if p is not None]
                multiprocessing.connection.wait(alive, timeout=0.2)
                if self._stopping.is_set():
                    return
                status = dict(self.workers_setup_status.copy())
                now = time.monotonic()
                for idx, proc in enumerate(self.inference_workers):
                    key = f"{self.api_endpoint}_{idx}"
                    if proc is None:
                        if now >= start_at[idx]:
                            self.inference_workers[idx] = self.launch_single_inference_worker(api, idx)
                            logger.warning("model worker %d restarted (pid %d)", idx, self.inference_workers[idx].pid)
                        continue
                    if status.get(key) == WorkerSetupStatus.READY:
                        ready_since.setdefault(idx, now)
                    if proc.is_alive():
                        continue
                    proc.join(0)
                    self.workers_setup_status[key] = WorkerSetupStatus.STARTING  # /health 503, its requests 503
                    stable = now - ready_since.pop(idx, now) >= limits.stable_after
                    failures[idx] = 1 if stable else failures[idx] + 1
                    delay = limits.restart_delay_after(failures[idx])
                    code = proc.exitcode
                    how = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
                    logger.error("model worker %d (pid %d) died (%s); restarting it in %.1f s", idx, proc.pid, how,
                                 delay)
                    self.inference_workers[idx] = None
                    start_at[idx] = now + delay
            except Exception:  # noqa: BLE001 - keep watching; the manager may be going away at shutdown
                if self._stopping.is_set():
                    return
                logger.exception("fastmvit worker monitor")
                time.sleep(0.5)

    def _perform_graceful_shutdown(self, manager, uvicorn_workers, shutdown_reason: str = "normal"):
        """Drain: stop accepting, let the HTTP processes finish what they admitted (the watchdog answers
        503 for whatever is left at the deadline), then stop the workers with a queue sentinel."""
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second signal must not cut the drain short
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        self._stopping.set()
        limits = self.serving_limits
        deadline = time.monotonic() + limits.drain_timeout
        self.drain_deadline.value = deadline
        logger.warning("shutting down: finishing admitted requests within %.0f s", limits.drain_timeout)
        for uw in uvicorn_workers.values():
            if uw.is_alive() and hasattr(uw, "terminate"):
                uw.terminate()  # uvicorn: stop accepting, finish open requests, exit
        # LitServe's queue manager was forked after the port was bound and holds it open too, so the kernel
        # would go on accepting connections that nobody serves: take the port out of listening for every
        # process (once the HTTP processes have stopped polling it) so new clients are refused at once.
        time.sleep(0.3)
        for sock in self._listen_sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for uw in uvicorn_workers.values():
            uw.join(timeout=max(0.1, deadline + 3 - time.monotonic()))
            if uw.is_alive() and hasattr(uw, "kill"):
                logger.error("HTTP process %s did not finish in time; killing it", uw.name)
                uw.kill()

        def stop_workers():  # a thread of its own: the main thread's manager connection may be mid-call
            for _ in self.inference_workers:
                for queue in self.litapi_request_queues.values():
                    queue.put(_SENTINEL_VALUE)

        t = threading.Thread(target=stop_workers, daemon=True)
        t.start()
        t.join(5)
        for iw in self.inference_workers:
            if iw is None:
                continue
            iw.join(timeout=10)
            if iw.is_alive():
                logger.error("model worker pid %d did not stop; killing it", iw.pid)
                iw.kill()
                iw.join(5)
        self._transport.close(send_sentinel=False)
        manager.shutdown()
        logger.warning("shut down")


def build_server(api: FastMViTAPI, *, accelerator: str = "auto", devices: Union[int, str] = "auto",
                 workers_per_device: int = 1) -> ResilientLitServer:
    """A ``ResilientLitServer`` for ``api``, with the request reader, ``/metrics`` and request metrics.
    Call ``use_multiprocess_dir()`` from ``fastmvit.serving.metrics`` before this for metrics across
    processes (``serve`` does)."""
    from . import metrics

    api.prepare()
    if api.task == "segmentation":
        metadata = {"model": api.model_name, "task": api.task, "input_size": api.decoder.cfg.input_size,
                    "classes": api.num_classes}
    else:
        metadata = {"model": api.model_name, "top_k": api.default_top_k, "input": list(api.decoder.image_shape)}
    server = ResilientLitServer(api, accelerator=accelerator, devices=devices, workers_per_device=workers_per_device,
                                model_metadata=metadata)
    server.app.state.fastmvit_api = api
    if metrics.available():
        server.app.add_route("/metrics", metrics.metrics_endpoint(), methods=["GET"])
        server.app.add_middleware(RequestMetricsMiddleware, path=api.api_path, metrics=api.metrics)
    return server


def serve(model: str = "s", weights=None, *, host: str = "127.0.0.1", port: int = 8000,
          device: str = "auto", devices: Union[int, str] = "auto", workers_per_device: int = 1,
          log_level: str = "info", **api_kwargs) -> None:
    """Start a LitServe server for ``model`` and block until it is stopped (SIGTERM or Ctrl+C: a graceful
    drain, see the module docstring). ``device``: "auto", "cpu" or "cuda"; ``api_kwargs`` go to
    ``FastMViTAPI``."""
    from . import metrics

    owner = os.getpid()
    server: Optional[ResilientLitServer] = None

    def stop(signum, frame):
        if os.getpid() != owner:
            return  # a forked child (LitServe's queue manager): the server process stops it when drained
        if server is None:
            raise KeyboardInterrupt
        server.request_shutdown()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    metrics.use_multiprocess_dir()
    api = FastMViTAPI(model, weights, **api_kwargs)
    accelerator = "auto" if device in (None, "auto") else device
    server = build_server(api, accelerator=accelerator, devices=devices, workers_per_device=workers_per_device)
    limits = api.serving_limits
    server.run(host=host, port=port, generate_client_file=False, log_level=log_level,
               http=idle_timeout_protocol(limits.idle_timeout))


def idle_timeout_protocol(seconds: float):
    """uvicorn's HTTP protocol class, closing a connection (with 408) that has not sent a complete request
    head within ``seconds`` of opening or of its last response: uvicorn alone keeps a silent connection
    open forever, and a slow-header client holds one as long as it likes."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    class IdleTimeoutProtocol(AutoHTTPProtocol):
        _head_timer = None

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm()

        def _arm(self):
            if self._head_timer is not None:
                self._head_timer.cancel()
            self._head_timer = self.loop.call_later(seconds, self._head_timeout)

        def on_headers_complete(self, *args):
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None
            return super().on_headers_complete(*args)

        def on_response_complete(self):
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc):
            if self._head_timer is not None:
                self._head_timer.cancel()
            super().connection_lost(exc)

        def _head_timeout(self):
            self._head_timer = None
            if self.transport.is_closing() or (self.cycle is not None and not self.cycle.response_complete):
                return  # a request is in progress: its own limits apply
            body = b'{"detail":"no complete request arrived within %g s"}' % seconds
            self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                                 b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
            self.transport.close()

    return IdleTimeoutProtocol
