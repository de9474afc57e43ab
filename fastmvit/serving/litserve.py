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
"""
# No `from __future__ import annotations` here: LitServe hands decode_request's annotation to FastAPI,
# which must see the real Annotated[..., Depends(...)] object, not a string.
import base64
import binascii
import json
import os
import time
from typing import Annotated, Optional, Sequence, Tuple, Union

import anyio
import litserve as ls
import numpy as np
from fastapi import Depends, HTTPException, Request

from .common import Classifier, ImageDecoder, InputLimits, RequestError, default_batch_sizes
from .metrics import RequestMetricsMiddleware, ServerMetrics

__all__ = ["FastMViTAPI", "build_server", "serve"]

NPY_TYPES = ("application/x-npy", "application/npy")

# What the HTTP process hands the worker for one request: (pixels [3, S, S] float32, top_k).
# A plain tuple of a NumPy array and an int: it crosses LitServe's multiprocessing queues with plain pickle.
Payload = Tuple[np.ndarray, int]


async def _payload(request: Request) -> Payload:
    """FastAPI dependency of the predict route; runs in the HTTP process."""
    return await request.app.state.fastmvit_api.read_request(request)


class FastMViTAPI(ls.LitAPI):
    """Serve a fastmvit classifier with LitServe's dynamic batching.

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
    """

    def __init__(self, model: str = "s", weights=None, *, pretrained: Union[bool, str] = True,
                 device: Optional[str] = None, dtype: Optional[str] = None, input_size: Optional[int] = None,
                 max_batch_size: int = 16, batch_timeout: float = 0.005, batch_sizes: Optional[Sequence[int]] = None,
                 top_k: int = 5, limits: InputLimits = InputLimits(), api_path: str = "/predict"):
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout, api_path=api_path)
        self.model_name, self.weights, self.pretrained = model, weights, pretrained
        self.device_override, self.dtype, self.input_size = device, dtype, input_size
        self.batch_sizes = tuple(batch_sizes or default_batch_sizes(max_batch_size))
        self.default_top_k, self.limits = top_k, limits
        self.metrics = ServerMetrics(max_batch_size)
        self.decoder: Optional[ImageDecoder] = None  # HTTP process: set by prepare()
        self.num_classes: Optional[int] = None
        self.classifier: Optional[Classifier] = None  # worker process: set by setup()
        self._slots = None  # HTTP process: made on first use, in that process's event loop

    # --- HTTP process -----------------------------------------------------------------------------
    def prepare(self) -> None:
        """Learn the input size, preprocessing and classes of the weights (a load on the CPU), so the HTTP
        process can check and decode requests. ``build_server`` calls it."""
        c = Classifier.load(self.model_name, self.weights, pretrained=self.pretrained, device="cpu",
                            dtype="float32", input_size=self.input_size, limits=self.limits)
        self.decoder, self.num_classes = c.decoder, c.num_classes
        if not 1 <= self.default_top_k <= self.num_classes:
            raise ValueError(f"top_k must lie in 1..{self.num_classes}, got {self.default_top_k}")

    async def read_request(self, request: Request) -> Payload:
        start = time.perf_counter()
        try:
            body = await self._read_body(request)
            kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
            top_k = request.query_params.get("top_k")
            if kind == "application/json":
                body, top_k = self._from_json(body, top_k)
            elif kind.startswith("multipart/"):
                raise RequestError(415, "multipart forms are not read: send the image itself as the body "
                                        "(curl --data-binary @image.jpg)")
            top_k = self._top_k(top_k)
            if kind in NPY_TYPES:
                pixels = self.decoder.read_npy(body)
            else:
                pixels = await anyio.to_thread.run_sync(self.decoder.decode, body, limiter=self._decode_slots())
        except RequestError as e:
            raise HTTPException(status_code=e.status, detail=e.message) from None
        self.metrics.decode(time.perf_counter() - start)
        return pixels, top_k

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
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise RequestError(413, f"the body exceeds the limit of {limit} bytes")
            chunks.append(chunk)
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
        self.classifier = Classifier.load(
            self.model_name, self.weights, pretrained=self.pretrained, device=self.device_override or device,
            dtype=self.dtype, input_size=self.input_size, limits=self.limits, batch_sizes=self.batch_sizes)
        self.metrics.warmup(self.classifier.warmup())

    def decode_request(self, request: Annotated[tuple, Depends(_payload)]) -> Payload:
        return request  # read, checked and decoded in the HTTP process already

    def batch(self, inputs):
        return np.stack([pixels for pixels, _ in inputs]), [k for _, k in inputs]

    def predict(self, x):
        images, ks = x
        start = time.perf_counter()
        logits = self.classifier.forward(images)
        self.metrics.batch(len(ks), time.perf_counter() - start)
        tops = self.classifier.top_k(logits, max(ks))
        return [[{"label": t["label"], "score": t["score"]} for t in top[:k]] for top, k in zip(tops, ks)]

    def unbatch(self, output):
        return output

    def encode_response(self, output):
        return output


def build_server(api: FastMViTAPI, *, accelerator: str = "auto", devices: Union[int, str] = "auto",
                 workers_per_device: int = 1, timeout: float = 30.0) -> "ls.LitServer":
    """A ``litserve.LitServer`` for ``api``, with the request reader, ``/metrics`` and request metrics.
    Call ``use_multiprocess_dir()`` from ``fastmvit.serving.metrics`` before this for metrics across
    processes (``serve`` does)."""
    from . import metrics

    api.prepare()
    server = ls.LitServer(api, accelerator=accelerator, devices=devices, workers_per_device=workers_per_device,
                          timeout=timeout, model_metadata={"model": api.model_name, "top_k": api.default_top_k,
                                                           "input": list(api.decoder.image_shape)})
    server.app.state.fastmvit_api = api
    if metrics.available():
        server.app.add_route("/metrics", metrics.metrics_endpoint(), methods=["GET"])
        server.app.add_middleware(RequestMetricsMiddleware, path=api.api_path, metrics=api.metrics)
    return server


def serve(model: str = "s", weights=None, *, host: str = "127.0.0.1", port: int = 8000,
          device: str = "auto", devices: Union[int, str] = "auto", workers_per_device: int = 1,
          timeout: float = 30.0, log_level: str = "info", **api_kwargs) -> None:
    """Start a LitServe server for ``model`` and block until it is stopped (Ctrl+C). ``device``: "auto",
    "cpu" or "cuda"; ``api_kwargs`` go to ``FastMViTAPI``."""
    import signal

    from . import metrics

    owner = os.getpid()

    def stop(signum, frame):  # SIGTERM as Ctrl+C: LitServe's graceful shutdown, then the atexit clean-up
        if os.getpid() == owner:
            raise KeyboardInterrupt
        signal.signal(signum, signal.SIG_DFL)  # a forked child inherited this handler: die quietly
        os.kill(os.getpid(), signum)

    signal.signal(signal.SIGTERM, stop)
    metrics.use_multiprocess_dir()
    api = FastMViTAPI(model, weights, **api_kwargs)
    accelerator = "auto" if device in (None, "auto") else device
    server = build_server(api, accelerator=accelerator, devices=devices, workers_per_device=workers_per_device,
                          timeout=timeout)
    server.run(host=host, port=port, generate_client_file=False, log_level=log_level)
