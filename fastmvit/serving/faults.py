"""What both serving plug-ins do when something fails, rather than when a request is bad:
time limits and queue bounds (``ServingLimits``), how a failed forward is told apart (out of memory: split
the batch and retry; a device fault that poisons the CUDA context: answer 503 and replace the worker;
anything else: 500 for that batch), and a test hook that imitates those failures on the CPU.

Test hook: the environment variable ``FASTMVIT_SERVING_FAULTS`` (read once by each model worker, after
warm-up) makes forwards fail on purpose. Comma-separated ``key=value``:

    device_error_when=PATH  once the file PATH exists, the next forward removes it and raises
                            torch.AcceleratorError("CUDA error: an illegal memory access was encountered"),
                            as a CUDA fault does
    hang_when=PATH          while the file PATH exists, forwards wait (a hung model)
    oom_above=N             every forward of more than N images raises torch.OutOfMemoryError
    delay=S                 every forward sleeps S seconds first (a slow model)

The files let a test trigger a fault at the moment it chooses, whichever worker process is running.

It exists for tests and drills; a production server must not set it (the server logs a warning when it is).
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Union

import torch

__all__ = ["ServingLimits", "Refusal", "forward_with_retries", "is_out_of_memory", "is_device_fault", "refusal_for",
           "InjectedFaults", "FAULTS_ENV"]

logger = logging.getLogger("fastmvit.serving")

FAULTS_ENV = "FASTMVIT_SERVING_FAULTS"


@dataclass(frozen=True)
class ServingLimits:
    """Time limits and bounds of one server, each answered with its own status.

    body_timeout: seconds to receive a request's body; a slower client gets 408.
    queue_timeout: seconds a request may wait for the model to take it; then 503 with Retry-After (the
        server is overloaded or its worker is restarting).
    inference_timeout: seconds from the model taking a request to its answer; then 504.
    max_queue: requests admitted at once per HTTP process (decoding, queued or running); more get 429.
    drain_timeout: on SIGTERM, seconds to finish the admitted requests before the rest get 503.
    retry_after: seconds, sent as Retry-After with 429 and 503.
    restart_delay, max_restart_delay: a worker that dies is restarted at once; if it dies again before it
        has served for ``stable_after`` seconds, the next start waits restart_delay, then twice that, ...
        up to max_restart_delay (a worker that cannot start does not spin).
    idle_timeout: seconds a connection may stay open without sending a complete request head; then 408
        and closed (idle and slow-header connections cost a socket each).
    """

    body_timeout: float = 30.0
    queue_timeout: float = 30.0
    inference_timeout: float = 30.0
    max_queue: int = 256
    drain_timeout: float = 30.0
    retry_after: int = 1
    restart_delay: float = 1.0
    max_restart_delay: float = 30.0
    stable_after: float = 30.0
    idle_timeout: float = 15.0

    def __post_init__(self):
        for name in ("body_timeout", "queue_timeout", "inference_timeout", "drain_timeout", "restart_delay",
                     "max_restart_delay", "stable_after", "idle_timeout"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"ServingLimits.{name} must be a positive number of seconds, got {value!r}")
        for name in ("max_queue", "retry_after"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ServingLimits.{name} must be a positive int, got {value!r}")
        if self.max_restart_delay < self.restart_delay:
            raise ValueError("ServingLimits.max_restart_delay must be >= restart_delay")

    def restart_delay_after(self, failures: int) -> float:
        """Seconds to wait before the next start of a worker that died ``failures`` times in a row without
        becoming stable: 0 for the first death, then restart_delay, 2x, 4x, ... up to max_restart_delay."""
        if failures <= 1:
            return 0.0
        return min(self.max_restart_delay, self.restart_delay * 2 ** (failures - 2))


@dataclass
class Refusal:
    """One request's failure inside a batch: the HTTP status, a message for the client, and whether the
    client should retry (Retry-After is sent for 503)."""

    status: int
    message: str
    retry: bool = False
    fatal: bool = False  # the worker cannot serve any more (poisoned device context): replace it


def is_out_of_memory(e: BaseException) -> bool:
    if isinstance(e, torch.OutOfMemoryError):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


_DEVICE_FAULT_TEXT = ("cuda error", "cublas_status", "cudnn_status", "device-side assert", "illegal memory access",
                      "unspecified launch failure", "cuda driver error")


def is_device_fault(e: BaseException) -> bool:
    """A GPU error that leaves the process's CUDA context unusable (illegal address, device-side assert,
    launch failure ...): every later CUDA call in this process fails too, so the worker must be replaced.
    Out of memory is not one of them."""
    if is_out_of_memory(e):
        return False
    if isinstance(e, getattr(torch, "AcceleratorError", ())):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and any(t in text for t in _DEVICE_FAULT_TEXT)


def refusal_for(e: BaseException) -> Refusal:
    """The answer to a request whose forward failed with ``e`` (never the exception's text: it may hold
    internals; the server log has it)."""
    if is_out_of_memory(e):
        return Refusal(503, "the model ran out of memory on this request even in a batch of its own; "
                            "retry later", retry=True)
    if is_device_fault(e):
        return Refusal(503, "the model worker hit a device error and is being replaced; retry shortly",
                       retry=True, fatal=True)
    return Refusal(500, "the model failed on the batch holding this request; see the server log")


def forward_with_retries(forward: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                         release: Callable[[], None] = lambda: None) -> List[Union[torch.Tensor, BaseException]]:
    """Run ``forward`` on ``images`` [N, ...]; return one entry per image: its output row, or the exception
    that failed it. Out of memory: ``release()`` (empty the allocator's cache), split the batch in halves
    and retry each, down to single images. Any other error fails the images of that (sub-)batch; after a
    device fault nothing more is tried (the context is poisoned)."""
    n = images.shape[0]
    try:
        return list(forward(images))
    except Exception as e:  # noqa: BLE001 - every failure is answered per image
        if not is_out_of_memory(e) or n == 1:
            return [e] * n
        logger.warning("out of memory on a batch of %d images: retrying it in halves", n)
        release()
    half = (n + 1) // 2
    first = forward_with_retries(forward, images[:half], release)
    fault = next((r for r in first if isinstance(r, BaseException) and is_device_fault(r)), None)
    if fault is not None:
        return first + [fault] * (n - half)
    return first + forward_with_retries(forward, images[half:], release)


class InjectedFaults:
    """The ``FASTMVIT_SERVING_FAULTS`` test hook (see the module docstring)."""

    KEYS = {"device_error_when": str, "hang_when": str, "oom_above": int, "delay": float}

    def __init__(self, spec: str = ""):
        self.spec = spec.strip()
        self.settings: Dict[str, Union[str, float]] = {}
        for item in filter(None, (s.strip() for s in self.spec.split(","))):
            key, sep, value = item.partition("=")
            if not sep or key not in self.KEYS:
                raise ValueError(f"{FAULTS_ENV}: expected key=value with key in {sorted(self.KEYS)}, got {item!r}")
            try:
                self.settings[key] = self.KEYS[key](value)
            except ValueError:
                raise ValueError(f"{FAULTS_ENV}: {key} needs a number, got {value!r}") from None
        self.forwards = 0

    @classmethod
    def from_env(cls) -> Optional["InjectedFaults"]:
        spec = os.environ.get(FAULTS_ENV, "")
        if not spec.strip():
            return None
        faults = cls(spec)
        logger.warning("%s=%s: forwards will fail on purpose (a test hook; unset it in production)",
                       FAULTS_ENV, spec)
        return faults

    def wrap(self, forward: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        def faulty(images: torch.Tensor) -> torch.Tensor:
            self.forwards += 1
            if "delay" in self.settings:
                time.sleep(self.settings["delay"])
            while "hang_when" in self.settings and os.path.exists(self.settings["hang_when"]):
                time.sleep(0.05)
            trigger = self.settings.get("device_error_when")
            if trigger and os.path.exists(trigger):
                try:
                    os.remove(trigger)
                except FileNotFoundError:  # another worker took it
                    return forward(images)
                raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered "
                                             f"(injected by {FAULTS_ENV})")
            if "oom_above" in self.settings and images.shape[0] > self.settings["oom_above"]:
                raise torch.OutOfMemoryError(f"CUDA out of memory: a batch of {images.shape[0]} images "
                                             f"(injected by {FAULTS_ENV})")
            return forward(images)

        return faulty
