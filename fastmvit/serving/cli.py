"""``python -m fastmvit serve``: start a LitServe server, or write a Triton model repository.

    python -m fastmvit serve --model s [--weights PATH] [--port 8000]     # LitServe, POST /predict
    python -m fastmvit serve triton REPO --model s [--weights PATH] ...   # = python -m fastmvit.serving.triton
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from .common import InputLimits
from .faults import ServingLimits


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fastmvit serve",
        description="Serve a fastmvit model over HTTP with LitServe: POST an encoded image to /predict "
                    "(curl --data-binary @cat.jpg http://127.0.0.1:8000/predict) and get "
                    '[{"label": ..., "score": ...}, ...] from a classifier, or from a segmentation model '
                    '(deeplabv3-<variant>) {"mask": "<base64 PNG of class indices>", "classes": [...], ...} '
                    "at the image's own size (the bare PNG with Accept: image/png). /health turns 200 after "
                    "warm-up; /metrics is Prometheus. `python -m fastmvit serve triton --help` writes a Triton "
                    "model repository instead.")
    p.add_argument("--model", default="s", help="variant: xxs, xs, s, v2-0.5 ... v2-2.0, or a segmentation model "
                                                "deeplabv3-<variant> (default s)")
    p.add_argument("--weights", help="checkpoint file or Hugging Face directory (default: pretrained)")
    p.add_argument("--random", action="store_true", help="random weights (no download); for smoke tests")
    p.add_argument("--host", default="127.0.0.1", choices=("127.0.0.1", "0.0.0.0", "::"),
                   help="address to listen on (default 127.0.0.1; 0.0.0.0 to accept other machines)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="where the model runs (default: cuda if available)")
    p.add_argument("--devices", default="auto", help="how many GPUs, one worker each (default: all)")
    p.add_argument("--workers-per-device", type=int, default=1, help="model workers per device (default 1)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "float16", "bfloat16"),
                   help="what runs inside (default: float16 on a GPU, float32 on the CPU)")
    p.add_argument("--input-size", type=int, help="square input size (default: the checkpoint's); for segmentation "
                                                   "the shorter side, the whole image is seen")
    p.add_argument("--max-batch-size", type=int, default=16, help="most requests per forward (default 16)")
    p.add_argument("--batch-timeout-ms", type=float, default=5.0,
                   help="how long the worker waits for a batch to fill, in ms (default 5)")
    p.add_argument("--top-k", type=int, default=5,
                   help="classes per answer unless ?top_k= says (default 5; classifiers only)")
    d = ServingLimits()
    p.add_argument("--body-timeout", type=float, default=d.body_timeout,
                   help=f"seconds to receive a request body, else 408 (default {d.body_timeout:g})")
    p.add_argument("--queue-timeout", type=float, default=d.queue_timeout,
                   help=f"seconds a request may wait for the model, else 503 + Retry-After (default {d.queue_timeout:g})")
    p.add_argument("--inference-timeout", type=float, default=d.inference_timeout,
                   help=f"seconds for the model to answer a request it took, else 504 (default {d.inference_timeout:g})")
    p.add_argument("--max-queue", type=int, default=d.max_queue,
                   help=f"requests admitted at once, more get 429 + Retry-After (default {d.max_queue})")
    p.add_argument("--drain-timeout", type=float, default=d.drain_timeout,
                   help=f"on SIGTERM, seconds to finish admitted requests (default {d.drain_timeout:g})")
    p.add_argument("--idle-timeout", type=float, default=d.idle_timeout,
                   help=f"seconds a connection may stay open without a request, else closed (default {d.idle_timeout:g})")
    p.add_argument("--max-body-bytes", type=int, default=InputLimits.max_bytes,
                   help=f"largest request body (default {InputLimits.max_bytes})")
    p.add_argument("--max-pixels", type=int, default=InputLimits.max_pixels,
                   help=f"largest decoded image, width x height (default {InputLimits.max_pixels})")
    p.add_argument("--min-side", type=int, default=InputLimits.min_side,
                   help=f"smallest image side in pixels (default {InputLimits.min_side})")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    return p


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "triton":
        from .triton import main as triton_main

        return triton_main(argv[1:])
    args = _parser().parse_args(argv)
    from ..errors import FastMViTError, message_for

    try:
        limits = InputLimits(args.max_body_bytes, args.max_pixels, args.min_side)
        serving_limits = ServingLimits(body_timeout=args.body_timeout, queue_timeout=args.queue_timeout,
                                       inference_timeout=args.inference_timeout, max_queue=args.max_queue,
                                       drain_timeout=args.drain_timeout, idle_timeout=args.idle_timeout)
        from .litserve import serve

        devices = int(args.devices) if str(args.devices).isdigit() else args.devices
        serve(args.model, args.weights, pretrained=not args.random, host=args.host, port=args.port,
              device=args.device, devices=devices, workers_per_device=args.workers_per_device,
              log_level=args.log_level, dtype=args.dtype, input_size=args.input_size,
              max_batch_size=args.max_batch_size, batch_timeout=args.batch_timeout_ms / 1000, top_k=args.top_k,
              limits=limits, serving_limits=serving_limits)
    except (FastMViTError, ValueError) as e:
        print(f"error: {message_for(e)}", file=sys.stderr)
        return 2
    except ImportError as e:
        print(f"error: {e}; install the serving extra: pip install 'fastmvit[serve]'", file=sys.stderr)
        return 2
    return 0
