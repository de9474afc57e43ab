"""What the serving tests share: a small checkpoint, real JPEG/PNG images, every bad input of issue 5,
the in-process reference, and a plain HTTP client (one connection per call, so threads never share one)."""
from __future__ import annotations

import contextlib
import http.client
import io
import json
import os
import struct
import sys
import zlib
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import fastmvit
from fastmvit.serving.common import scaled_preprocess
from fastmvit.serving.launch import ServerProcess, free_port

from ..utils import randomize_, varied_images

MODEL = "xxs"
SEGMENTATION_MODEL = "deeplabv3-xxs"
SEGMENTATION_SIZE = 64  # the shorter side it sees: logits of 4 x 5 or so, masks of thousands of pixels
INPUT_SIZE = 128     # served size: a quarter of 256's compute on 2 CPU cores
MAX_BATCH = 8
SECRET = b"SECRET-INPUT-7f3a"  # planted in bad inputs: no answer may echo it


def write_checkpoint(path) -> str:
    """Random xxs weights as safetensors. A random network's pooled features barely depend on the image,
    so the head is re-centred and scaled: different images then get different classes and scores, and a
    wrong or mixed-up answer shows."""
    from safetensors.torch import save_file

    model = randomize_(fastmvit.load(MODEL, pretrained=False))
    x = torch.rand(16, 3, INPUT_SIZE, INPUT_SIZE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        mean = model.forward_features(x).mean(dim=(-2, -1)).mean(0)
        model.head.fc.weight.mul_(300)
        model.head.fc.bias.copy_(-(model.head.fc.weight @ mean))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)


def write_segmentation_checkpoint(path) -> str:
    """Random DeepLabV3-xxs weights with the classifier re-centred on the head's features, so neighbouring
    pixels get different classes (a random head gives one class everywhere) and a wrong mask shows."""
    from safetensors.torch import save_file

    model = randomize_(fastmvit.load(SEGMENTATION_MODEL, pretrained=False))
    with torch.no_grad():
        feats = model.head.aspp(model.backbone.forward_stages(varied_images((6, 3, 64, 80)))[-1])
        f = feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1])
        w = model.head.classifier.weight
        spread = (f - f.mean(0)) @ w[:, :, 0, 0].t()
        w.mul_(3 / spread.std())
        model.head.classifier.bias.copy_(-(w[:, :, 0, 0] @ f.mean(0)))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)


def png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def resized(data: bytes) -> torch.Tensor:
    """The model's input, written out here: RGB, shorter side to SEGMENTATION_SIZE (PIL bilinear), BGR, / 255."""
    img = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = img.size
    s = SEGMENTATION_SIZE / min(w, h)
    img = img.resize((round(w * s), round(h * s)), Image.BILINEAR)
    arr = np.asarray(img)[..., ::-1].astype(np.float64) / 255
    return torch.from_numpy(np.ascontiguousarray(arr.astype(np.float32).transpose(2, 0, 1)))


def reference(model, pixels: torch.Tensor, size):
    """(labels [H, W], top-two margin [H, W]) of the in-process torch model, resized as HF's
    post_process_semantic_segmentation does (bilinear, align_corners=False), then argmax."""
    with torch.inference_mode():
        up = F.interpolate(model(pixels[None]), size=size, mode="bilinear", align_corners=False)[0]
    top = up.topk(2, dim=0).values
    return up.argmax(0).numpy(), (top[0] - top[1]).numpy()


def assert_mask(png_bytes: bytes, ref) -> np.ndarray:
    """The PNG holds the reference's labels at its size. Pixels may differ only where the reference's two
    best classes are within float error of each other (the server may run another batch size)."""
    labels, margin = ref
    img = Image.open(io.BytesIO(png_bytes))
    assert img.format == "PNG" and img.mode == "P"
    got = np.array(img)
    assert got.shape == labels.shape
    differ = got != labels
    assert not (differ & (margin > 1e-3)).any(), f"{differ.sum()} of {differ.size} pixels differ"
    assert len(np.unique(labels)) > 3  # the check means something: several classes in the mask
    return got


def image_ref(model, data: bytes):
    """``reference`` for an encoded image, at its own size."""
    img = Image.open(io.BytesIO(data))
    return reference(model, resized(data), (img.size[1], img.size[0]))


def encode(arr: np.ndarray, fmt: str, **kw) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **kw)
    return buf.getvalue()


def good_images() -> Dict[str, bytes]:
    """Real JPEGs and PNGs of awkward sizes, each different (noise, gradients, a grey PNG, an RGBA PNG)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:90, 0:120]
    grad = np.stack([xx * 2, yy * 2, (xx + yy)], -1).astype(np.uint8)
    return {
        "noise.jpg": encode((rng.random((48, 64, 3)) * 255).astype(np.uint8), "JPEG", quality=90),
        "gradient.jpg": encode(grad, "JPEG"),
        "tall.png": encode((rng.random((131, 97, 3)) * 255).astype(np.uint8), "PNG"),
        "stripes.png": encode(np.repeat(((xx // 8) % 2 * 255).astype(np.uint8)[..., None], 3, -1), "PNG"),
        "grey.png": encode((yy * 2).astype(np.uint8), "PNG"),
        "rgba.png": encode(np.concatenate([grad, np.full((90, 120, 1), 200, np.uint8)], -1), "PNG"),
    }


def png_declaring(width: int, height: int) -> bytes:
    """A tiny valid-looking PNG whose header declares ``width x height`` (a decompression bomb's trick)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def bad_images(max_body: int) -> Dict[str, Tuple[bytes, str]]:
    """Every bad encoded input of the issue: name -> (bytes, what the message must mention)."""
    jpeg = good_images()["gradient.jpg"]
    rng = np.random.default_rng(1)
    big = encode((rng.random((int((max_body / 3) ** 0.5) + 40,) * 2 + (3,)) * 255).astype(np.uint8), "PNG")
    assert len(big) > max_body
    return {
        "not_an_image": (b"this is not an image " + SECRET * 20, "not an image"),
        "truncated_jpeg": (jpeg[: len(jpeg) // 2], "truncated"),
        "one_pixel": (encode(np.zeros((1, 1, 3), np.uint8), "PNG"), "too small"),
        "bomb": (png_declaring(100_000, 100_000), "decompression bomb"),
        "over_pixel_limit": (png_declaring(8000, 6000), "exceeds the limit"),
        "over_large_body": (big, "exceeds the limit"),
        "empty": (b"", "empty"),
    }


def reference_logits(checkpoint: str, images: List[bytes]) -> torch.Tensor:
    """The in-process answer: fastmvit.load + preprocess at the served size, one image at a time."""
    model = fastmvit.load(MODEL, checkpoint)
    cfg = scaled_preprocess(model.pretrained_cfg["preprocess"], INPUT_SIZE)
    with torch.inference_mode():
        return torch.cat([model(fastmvit.preprocess([im], cfg)) for im in images])


def preprocessed(checkpoint: str, images: List[bytes]) -> torch.Tensor:
    model = fastmvit.load(MODEL, checkpoint)
    return fastmvit.preprocess(images, scaled_preprocess(model.pretrained_cfg["preprocess"], INPUT_SIZE))


def assert_same_top_k(answer: List[dict], ref_logits: torch.Tensor, k: int, labels=None) -> None:
    """``answer`` ([{"label", "score"}], best first) is the top-k of ``ref_logits`` ([C]): the same classes
    in the same order and the same softmax scores, allowing for the float error of another batch size."""
    labels = labels or fastmvit.imagenet_classes()
    probs = ref_logits.float().softmax(-1)
    scores, idx = probs.topk(k)
    assert len(answer) == k
    tol = 1e-3 * float(scores[0]) + 1e-7
    for a, s, i in zip(answer, scores.tolist(), idx.tolist()):
        if a["label"] != labels[i]:  # allowed only for a near tie with the reference's class
            assert abs(float(probs[labels.index(a["label"])]) - s) <= tol, (answer, labels[i], s)
        assert abs(a["score"] - s) <= tol, (a, s)


def post(port: int, path: str, body: bytes, content_type: Optional[str] = None,
         timeout: float = 120.0) -> Tuple[int, object]:
    """POST and return (status, parsed JSON or raw text)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = {"Content-Type": content_type} if content_type else {}
        conn.request("POST", path, body=body, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
    finally:
        conn.close()
    try:
        return resp.status, json.loads(raw)
    except ValueError:
        return resp.status, raw.decode(errors="replace")


def get(port: int, path: str, timeout: float = 30.0) -> Tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read().decode(errors="replace")
    finally:
        conn.close()


def prometheus_samples(text: str, name: str) -> Dict[str, float]:
    """``{labels: value}`` of one metric in the Prometheus text format (labels as written, "" if none)."""
    out = {}
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            rest = key[len(name):]
            if rest and rest[0] not in "{":
                continue
            out[rest.strip("{}")] = float(value)
    return out


def serve_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """The environment of a ``fastmvit serve`` a test starts: this one, with ``extra``, without an inherited
    Prometheus multiprocess directory, and one OpenMP thread per process: on a shared, oversubscribed CPU,
    OpenMP's spinning threads make a forward ~20x slower (measured: 3.5 s vs 0.15 s for one 128x128 image at
    a load of 11 on 2 cores)."""
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra or {})
    return env


@contextlib.contextmanager
def litserve_process(args: Sequence[str], log_dir, env: Optional[Dict[str, str]] = None
                     ) -> Iterator[Tuple[int, ServerProcess]]:
    """``python -m fastmvit serve --device cpu --port PORT *args`` on a free port, ready (its /health 200):
    yields (port, process), stopped on exit; its log in ``log_dir``/server.log; ``env``: see ``serve_env``."""
    port = free_port()
    cmd = [sys.executable, "-m", "fastmvit", "serve", "--device", "cpu", "--port", str(port), *args]
    proc = ServerProcess(cmd, env=serve_env(env), log_path=str(Path(log_dir) / "server.log"), name="litserve").start()
    try:
        proc.wait_ready(f"http://127.0.0.1:{port}/health", timeout=300)
        yield port, proc
    finally:
        proc.stop()
