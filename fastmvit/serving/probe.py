"""A readiness probe that asks the model itself: one small inference, with a time limit.

    python -m fastmvit.serving.probe triton --url 127.0.0.1:8000 [--model fastmvit] [--timeout 5]
    python -m fastmvit.serving.probe litserve --url 127.0.0.1:8000 [--timeout 5]

Exit 0 when the model answered with finite logits of the right shape, 1 otherwise (the reason on stderr):
an exec readiness probe for Kubernetes, or a health check for a load balancer's agent.

Why not the server's own health endpoint: Triton's ``/v2/health/ready`` and ``/v2/models/<m>/ready`` keep
answering 200 after a Python-backend stub process has died or hung (triton-inference-server/server issues
8604 and 7230; releases after 2.51 restart no stub), and a fastmvit instance whose CUDA context was poisoned
refuses every request while Triton still calls it ready. An inference is the one signal that covers them
all. LitServe's ``/health`` is accurate (the worker monitor keeps it 503 while a worker restarts); the
LitServe probe checks it and then sends one image as well.
"""
from __future__ import annotations

import argparse
import http.client
import io
import json
import math
import sys
from typing import List, Optional, Tuple

__all__ = ["probe_triton", "probe_litserve", "main"]


def _request(host: str, port: int, method: str, path: str, body: Optional[bytes] = None,
             headers: Optional[dict] = None, timeout: float = 5.0) -> Tuple[int, bytes, dict]:
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read(), dict(resp.getheaders())
    finally:
        conn.close()


def _split(url: str) -> Tuple[str, int]:
    url = url.split("://", 1)[-1].rstrip("/")
    host, _, port = url.rpartition(":")
    return host or "127.0.0.1", int(port)


def probe_triton(url: str, model: str = "fastmvit", timeout: float = 5.0) -> Optional[str]:
    """None when ``model`` on the Triton server at ``url`` (host:port of its HTTP endpoint) answers one
    image of mid-grey with finite logits; else what is wrong."""
    host, port = _split(url)
    status, body, _ = _request(host, port, "GET", f"/v2/models/{model}", timeout=timeout)
    if status != 200:
        return f"model metadata: HTTP {status}: {body[:200]!r}"
    meta = json.loads(body)
    image = next((i for i in meta.get("inputs", []) if i["name"] == "image"), None)
    if image is None:
        return f"model {model} has no 'image' input: not a fastmvit repository?"
    shape = [1] + [int(d) for d in image["shape"][1:]]
    count = math.prod(shape)
    raw = b"\x00\x00\x00\x3f" * count  # float32 0.5, little-endian
    header = json.dumps({"inputs": [{"name": "image", "shape": shape, "datatype": "FP32",
                                     "parameters": {"binary_data_size": len(raw)}}],
                         "outputs": [{"name": "logits", "parameters": {"binary_data": False}}]}).encode()
    status, body, _ = _request(host, port, "POST", f"/v2/models/{model}/infer", header + raw,
                               {"Inference-Header-Content-Length": str(len(header)),
                                "Content-Type": "application/octet-stream"}, timeout=timeout)
    if status != 200:
        return f"inference: HTTP {status}: {body[:300]!r}"
    out = next((o for o in json.loads(body).get("outputs", []) if o["name"] == "logits"), None)
    if out is None or not out.get("data"):
        return "inference: no logits in the answer"
    if not all(math.isfinite(v) for v in out["data"]):
        return "inference: non-finite logits"
    return None


def probe_litserve(url: str, timeout: float = 5.0, path: str = "/predict") -> Optional[str]:
    """None when the LitServe server at ``url`` is ready and answers one small PNG; else what is wrong."""
    import numpy as np
    from PIL import Image

    host, port = _split(url)
    status, body, _ = _request(host, port, "GET", "/health", timeout=timeout)
    if status != 200:
        return f"/health: HTTP {status}"
    buf = io.BytesIO()
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(buf, format="PNG")
    status, body, _ = _request(host, port, "POST", f"{path}?top_k=1", buf.getvalue(),
                               {"Content-Type": "image/png"}, timeout=timeout)
    if status != 200:
        return f"{path}: HTTP {status}: {body[:300]!r}"
    answer = json.loads(body)
    if not (isinstance(answer, list) and answer and math.isfinite(float(answer[0]["score"]))):
        return f"{path}: unexpected answer {body[:200]!r}"
    return None


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastmvit.serving.probe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("server", choices=("triton", "litserve"))
    p.add_argument("--url", default="127.0.0.1:8000", help="host:port of the HTTP endpoint (default 127.0.0.1:8000)")
    p.add_argument("--model", default="fastmvit", help="Triton model name (default fastmvit)")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds for each call (default 5)")
    args = p.parse_args(argv)
    try:
        problem = (probe_triton(args.url, args.model, args.timeout) if args.server == "triton"
                   else probe_litserve(args.url, args.timeout))
    except (OSError, http.client.HTTPException, ValueError, KeyError) as e:
        problem = f"{type(e).__name__}: {e}"
    if problem:
        print(f"not ready: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
