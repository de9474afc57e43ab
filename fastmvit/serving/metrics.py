"""Prometheus metrics of the LitServe plug-in.

LitServe answers HTTP in one process and runs the model in another, so the metrics use prometheus_client's
multiprocess mode: every process writes its values to files in ``PROMETHEUS_MULTIPROC_DIR`` and
``/metrics`` adds them up. ``use_multiprocess_dir()`` must run before prometheus_client is first imported.
Without prometheus_client every call here does nothing and ``/metrics`` is not mounted.
"""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import time
from typing import Optional, Sequence

__all__ = ["use_multiprocess_dir", "available", "ServerMetrics", "metrics_endpoint", "RequestMetricsMiddleware"]

ENV = "PROMETHEUS_MULTIPROC_DIR"


def available() -> bool:
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        return False
    return True


def use_multiprocess_dir() -> Optional[str]:
    """Point ``PROMETHEUS_MULTIPROC_DIR`` at a fresh folder (removed at exit) unless it is set already."""
    if os.environ.get(ENV):
        return os.environ[ENV]
    path = tempfile.mkdtemp(prefix="fastmvit-metrics-")
    os.environ[ENV] = path
    owner = os.getpid()
    # only the process that made it removes it (forked children run atexit handlers too)
    atexit.register(lambda: os.getpid() == owner and shutil.rmtree(path, ignore_errors=True))
    return path


class ServerMetrics:
    """The plug-in's metrics, created on first use in each process (after fork or spawn)."""

    def __init__(self, max_batch_size: int = 64):
        self.max_batch_size = max_batch_size
        self._m = None

    def __getstate__(self):  # metric objects stay in the process that made them
        return {"max_batch_size": self.max_batch_size, "_m": None}

    def _metrics(self):
        if self._m is None:
            if not available():
                self._m = {}
                return self._m
            from prometheus_client import Counter, Histogram

            # one bucket per size, so the histogram is exact up to 64
            sizes = (list(range(1, self.max_batch_size + 1)) if self.max_batch_size <= 64
                     else [2 ** i for i in range(self.max_batch_size.bit_length())] + [self.max_batch_size])
            self._m = {
                "requests": Counter("fastmvit_requests", "requests to the predict route, by HTTP status", ["code"]),
                "latency": Histogram("fastmvit_request_seconds", "time from request to response, all statuses"),
                "decode": Histogram("fastmvit_decode_seconds", "time to read, check and decode one request"),
                "batch": Histogram("fastmvit_batch_size", "requests in each batch the model ran", buckets=sizes),
                "forward": Histogram("fastmvit_forward_seconds", "time of each batched forward pass"),
                "warmup": Counter("fastmvit_warmup_forwards", "warm-up forwards run, by batch size", ["batch_size"]),
            }
        return self._m

    def request(self, code: int, seconds: float) -> None:
        m = self._metrics()
        if m:
            m["requests"].labels(code=str(code)).inc()
            m["latency"].observe(seconds)

    def decode(self, seconds: float) -> None:
        m = self._metrics()
        if m:
            m["decode"].observe(seconds)

    def batch(self, size: int, seconds: float) -> None:
        m = self._metrics()
        if m:
            m["batch"].observe(size)
            m["forward"].observe(seconds)

    def warmup(self, sizes: Sequence[int]) -> None:
        m = self._metrics()
        if m:
            for b in sizes:
                m["warmup"].labels(batch_size=str(b)).inc()


def metrics_endpoint():
    """A Starlette endpoint serving every process's metrics in the Prometheus text format."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess
    from starlette.responses import Response

    async def endpoint(request):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return endpoint


class RequestMetricsMiddleware:
    """ASGI middleware: count the responses of one route by status and time them."""

    def __init__(self, app, path: str, metrics: ServerMetrics):
        self.app, self.path, self.metrics = app, path, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != self.path:
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500

        async def send_and_record(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            self.metrics.request(status, time.perf_counter() - start)
