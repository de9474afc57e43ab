"""What the Triton and LitServe plug-ins share: the checks a request passes before it may join a batch,
and the model behind a server (float32 on the wire, float16 inside on a GPU, warm-up of every batch size).

Nothing here imports a server library, so both plug-ins and their tests can use it anywhere.
"""
from __future__ import annotations

import dataclasses
import io
import math
import os
import re
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..errors import InputError
from ..masks import label_map, mask_png
from ..model import MIN_INPUT_SIZE
from ..preprocess import PreprocessConfig, imagenet_classes, load_image, preprocess, topk
from ..variants import get_variant

__all__ = [
    "InputLimits", "RequestError", "ImageDecoder", "SegmentationDecoder", "Classifier", "Segmenter",
    "default_batch_sizes", "resolve_device", "resolve_dtype", "scaled_preprocess",
]


@dataclass(frozen=True)
class InputLimits:
    """What a server accepts from one request.

    max_bytes: the largest request body / encoded image, in bytes.
    max_pixels: the largest decoded image (width * height); larger ones are refused before decoding
        (decompression bombs declare a huge size in a tiny file).
    min_side: the smallest side of a decoded image; MobileViT downsamples by 32, and an image smaller than
        that carries too little to classify.
    """

    max_bytes: int = 20 * 2**20
    max_pixels: int = 40_000_000
    min_side: int = MIN_INPUT_SIZE

    def __post_init__(self):
        for field in ("max_bytes", "max_pixels", "min_side"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"InputLimits.{field} must be a positive int, got {value!r}")


class RequestError(Exception):
    """A request the server refuses. ``status`` is the HTTP status to answer with (400, 413, 415, 422);
    ``message`` says what was wrong without echoing the request's content."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


# HTTP status for each kind of image error (fastmvit.InputError.reason); anything else is a 400.
_STATUS = {"not_an_image": 415, "too_large": 413, "too_small": 422}

_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")


def _clean(message: str, limit: int = 300) -> str:
    """A message safe to send back: printable ASCII, bounded length (a decoder's error text could quote
    bytes of the input)."""
    message = _UNPRINTABLE.sub("?", message)
    return message if len(message) <= limit else message[: limit - 3] + "..."


def scaled_preprocess(cfg: PreprocessConfig, input_size: Optional[int]) -> PreprocessConfig:
    """``cfg`` at another input size, keeping its resize-to-crop ratio (256/288 stays 0.889)."""
    if input_size is None or input_size == cfg.input_size:
        return cfg
    if not isinstance(input_size, int) or input_size < MIN_INPUT_SIZE:
        raise ValueError(f"input_size must be an int >= {MIN_INPUT_SIZE}, got {input_size!r}")
    return dataclasses.replace(cfg, input_size=input_size,
                               resize=max(input_size, round(input_size * cfg.resize / cfg.input_size)))


class ImageDecoder:
    """Validate and decode one request's image, the way the in-process model's ``preprocess`` does.

    ``decode(data)`` takes encoded bytes (JPEG, PNG, WebP, ...) and returns a ``[3, S, S]`` float32 NumPy
    array in [0, 1]; ``check_images(x)`` checks preprocessed pixels ``[N, 3, S, S]``; ``read_npy`` reads one
    image sent as a ``.npy`` file. All raise ``RequestError``. Thread-safe, and free of torch ops, so a
    server may run it in threads of a process forked after torch was used.
    """

    def __init__(self, cfg: PreprocessConfig, limits: InputLimits = InputLimits()):
        self.cfg = cfg
        self.limits = limits

    @property
    def image_shape(self) -> Tuple[int, int, int]:
        return (3, self.cfg.input_size, self.cfg.input_size)

    def decode(self, data: Union[bytes, bytearray, memoryview]) -> np.ndarray:
        return preprocess(self._open(data), self.cfg).numpy()

    def _open(self, data) -> "PIL.Image.Image":  # noqa: F821
        """The checked, decoded RGB image."""
        if data is None or len(data) == 0:
            raise RequestError(400, "empty request: send an encoded image (JPEG, PNG, WebP, ...)")
        if len(data) > self.limits.max_bytes:
            raise RequestError(413, f"an image of {len(data)} bytes exceeds the limit of "
                                    f"{self.limits.max_bytes} bytes")
        try:
            return load_image(bytes(data), min_side=self.limits.min_side, max_pixels=self.limits.max_pixels)
        except InputError as e:
            raise RequestError(_STATUS.get(e.reason, 400), _clean(str(e))) from None

    def check_images(self, x: Union[np.ndarray, torch.Tensor]) -> Union[np.ndarray, torch.Tensor]:
        """Return ``x`` if it is ``[N, 3, S, S]`` float32 pixels, all finite; else raise RequestError (422)."""
        shape = tuple(x.shape)
        dtype = str(x.dtype).replace("torch.", "")
        if dtype != "float32":
            raise RequestError(422, f"expected float32 pixels in [0, 1], got {dtype}")
        if len(shape) != 4 or shape[1:] != self.image_shape:
            S = self.cfg.input_size
            raise RequestError(422, f"expected images of shape [N, 3, {S}, {S}], got {list(shape)}")
        if shape[0] < 1:
            raise RequestError(422, "expected at least one image, got an empty batch")
        finite = torch.isfinite(x).all() if isinstance(x, torch.Tensor) else np.isfinite(x).all()
        if not bool(finite):
            raise RequestError(422, "the image tensor holds NaN or infinite values")
        return x

    def read_npy(self, data: bytes) -> np.ndarray:
        """One image as a NumPy ``.npy`` file, ``[3, S, S]`` or ``[1, 3, S, S]`` float32 -> ``[3, S, S]``.

        The header is checked before any array is allocated, so a file declaring a huge shape costs nothing.
        """
        fp, shape, fortran_order, dtype = self._npy_header(data, "[3, S, S]")
        S = self.cfg.input_size
        if dtype != np.dtype("<f4"):
            raise RequestError(422, f"expected float32 pixels in [0, 1], got {_clean(str(dtype), 40)}")
        if tuple(shape) == (1,) + self.image_shape:
            shape = shape[1:]
        elif len(shape) == 4 and tuple(shape[1:]) == self.image_shape:
            raise RequestError(422, f"one image per request: got a batch of {shape[0]}; send them as "
                                    f"separate requests, the server batches them")
        if tuple(shape) != self.image_shape:
            raise RequestError(422, f"expected an image of shape [3, {S}, {S}], got {list(shape)}")
        return self.check_images(self._npy_values(fp, shape, fortran_order)[None])[0]

    def _npy_header(self, data: bytes, expected: str):
        """(file, shape, fortran_order, dtype) of a ``.npy`` body, read without allocating its array."""
        if not data:
            raise RequestError(400, f"empty request: send a .npy array of shape {expected}")
        if len(data) > self.limits.max_bytes:
            raise RequestError(413, f"a body of {len(data)} bytes exceeds the limit of {self.limits.max_bytes} bytes")
        fp = io.BytesIO(data)
        fmt = np.lib.format
        try:
            version = fmt.read_magic(fp)
            read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            shape, fortran_order, dtype = read_header(fp)
        except (ValueError, OSError, SyntaxError, TypeError):
            raise RequestError(400, "the body is not a valid .npy array") from None
        return fp, tuple(shape), fortran_order, dtype

    @staticmethod
    def _npy_values(fp, shape, fortran_order) -> np.ndarray:
        count = math.prod(shape)
        raw = fp.read(count * 4 + 1)
        if len(raw) != count * 4:
            raise RequestError(400, f"the .npy array is truncated: its header declares {count} float32 values")
        x = np.frombuffer(raw, dtype="<f4").reshape(shape, order="F" if fortran_order else "C")
        return np.ascontiguousarray(x)


# Segmentation serves whole images, resized so the shorter side is the input size; a longer side more than
# this many times the shorter would make the model's input (and its memory) grow without bound.
MAX_ASPECT = 4


class SegmentationDecoder(ImageDecoder):
    """``ImageDecoder`` for segmentation models, which see the whole image, not a centre crop.

    ``decode(data)`` returns ``(pixels, (H, W))``: ``[3, h, w]`` float32 in [0, 1], the image resized so its
    shorter side is the input size S, as ``python -m fastmvit predict`` does (``fastmvit.masks``); and the
    image's own size, the size of its mask. ``check_images(x)`` checks ``[N, 3, H, W]`` pixels sent as
    tensors (the mask then has their size); ``read_npy`` reads one ``[3, H, W]``. The model's input has at
    most ``max_input_pixels`` (S x 4S): a more elongated image gets a 422.
    """

    @property
    def max_input_pixels(self) -> int:
        return MAX_ASPECT * self.cfg.input_size ** 2

    def decode(self, data) -> Tuple[np.ndarray, Tuple[int, int]]:
        from ..masks import whole_image_array

        img = self._open(data)
        w, h = img.size
        if max(w, h) > MAX_ASPECT * min(w, h):
            raise RequestError(422, f"an image of {w}x{h} is more elongated than {MAX_ASPECT}:1, the most a "
                                    f"segmentation model here takes whole; crop it first")
        return whole_image_array(img, self.cfg), (h, w)

    def check_images(self, x):
        shape = tuple(x.shape)
        dtype = str(x.dtype).replace("torch.", "")
        if dtype != "float32":
            raise RequestError(422, f"expected float32 pixels in [0, 1], got {dtype}")
        if len(shape) != 4 or shape[1] != 3:
            raise RequestError(422, f"expected images of shape [N, 3, H, W], got {list(shape)}")
        if shape[0] < 1:
            raise RequestError(422, "expected at least one image, got an empty batch")
        self._check_size(shape[2], shape[3])
        finite = torch.isfinite(x).all() if isinstance(x, torch.Tensor) else np.isfinite(x).all()
        if not bool(finite):
            raise RequestError(422, "the image tensor holds NaN or infinite values")
        return x

    def _check_size(self, h: int, w: int) -> None:
        if min(h, w) < self.limits.min_side:
            raise RequestError(422, f"an image of {w}x{h} is too small; each side needs at least "
                                    f"{self.limits.min_side} pixels")
        if h * w > self.max_input_pixels:
            S = self.cfg.input_size
            raise RequestError(422, f"an image tensor of {w}x{h} exceeds the {self.max_input_pixels} pixels "
                                    f"({S}x{MAX_ASPECT * S}) a segmentation model here takes; resize it so its "
                                    f"shorter side is {S}")

    def read_npy(self, data: bytes) -> np.ndarray:
        """One image as a ``.npy`` file, ``[3, H, W]`` or ``[1, 3, H, W]`` float32 -> ``[3, H, W]``."""
        fp, shape, fortran_order, dtype = self._npy_header(data, "[3, H, W]")
        if dtype != np.dtype("<f4"):
            raise RequestError(422, f"expected float32 pixels in [0, 1], got {_clean(str(dtype), 40)}")
        if len(shape) == 4 and shape[1] == 3:
            if shape[0] != 1:
                raise RequestError(422, f"one image per request: got a batch of {shape[0]}; send them as "
                                        f"separate requests, the server batches them")
            shape = shape[1:]
        if len(shape) != 3 or shape[0] != 3:
            raise RequestError(422, f"expected an image of shape [3, H, W], got {list(shape)}")
        self._check_size(shape[1], shape[2])
        return self.check_images(self._npy_values(fp, shape, fortran_order)[None])[0]


# -------------------------------------------------------------------------------------------------
# The model behind a server

def default_batch_sizes(max_batch_size: int) -> Tuple[int, ...]:
    """1, 2, 4, ... up to ``max_batch_size`` (always included): the batch sizes a server warms up and,
    on a GPU, captures one CUDA graph for."""
    if not isinstance(max_batch_size, int) or max_batch_size < 1:
        raise ValueError(f"max_batch_size must be a positive int, got {max_batch_size!r}")
    sizes, b = [], 1
    while b < max_batch_size:
        sizes.append(b)
        b *= 2
    return tuple(sizes + [max_batch_size])


def resolve_device(device: Union[str, torch.device, None]) -> torch.device:
    """None or "auto": the first GPU when there is one, else the CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_dtype(dtype: Union[str, torch.dtype, None], device: torch.device) -> torch.dtype:
    """None or "auto": float16 on a GPU (float32 on the wire all the same), float32 on the CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be auto, {', '.join(_DTYPES)}; got {dtype!r}")
    return _DTYPES[dtype]


def say(message: str) -> None:
    """A progress line on stderr (a server's log), marked as fastmvit's, with the process id: a server runs
    one model per worker process."""
    print(f"fastmvit[{os.getpid()}]: {message}", file=sys.stderr, flush=True)


def _load_fn():
    from .. import load

    return load


def _parallel_kernel_warmup(model, batch_sizes, size) -> None:
    """Compile the engine's kernels in parallel before the serial warm-up forwards; only a speed-up, so a
    failure is reported and the forwards compile what is left."""
    import warnings

    from ..engine.warmup import warmup

    try:
        report = warmup(model, batch_sizes, [tuple(size)])
    except Exception as e:
        warnings.warn(f"fastmvit: the parallel kernel warm-up failed ({type(e).__name__}: {e}); the warm-up "
                      f"forwards compile the kernels one by one instead")
        return
    if report.failures:
        warnings.warn(f"fastmvit: {len(report.failures)} kernel(s) failed to compile in the parallel warm-up, "
                      f"first: {report.failures[0]}")


class Classifier:
    """A fastmvit model behind a server: float32 images in, float32 logits out, whatever runs inside.

    ``forward`` takes ``[B, 3, S, S]`` float32 (any B) and returns ``[B, num_classes]`` float32 on the CPU.
    With ``pad_batches`` (default on a GPU) a batch is padded up to the next of ``batch_sizes``, so every
    forward runs at a size that was warmed up, i.e. one that has a captured CUDA graph once the engine
    captures them; a batch larger than the largest size runs in chunks.
    """

    task = "classification"

    def __init__(self, model: torch.nn.Module, *, batch_sizes: Sequence[int] = (1,), input_size: Optional[int] = None,
                 limits: InputLimits = InputLimits(), pad_batches: Optional[bool] = None):
        p = next(model.parameters())
        self.model = model
        self.device, self.dtype = p.device, p.dtype
        cfg = model.pretrained_cfg.get("preprocess") or PreprocessConfig()
        self.decoder = ImageDecoder(scaled_preprocess(cfg, input_size), limits)
        labels = model.pretrained_cfg.get("labels")
        self.labels: Optional[List[str]] = imagenet_classes() if labels == "imagenet-1k" else labels
        self.num_classes = model.num_classes
        self.batch_sizes = tuple(sorted(set(int(b) for b in batch_sizes)))
        if not self.batch_sizes or self.batch_sizes[0] < 1:
            raise ValueError(f"batch_sizes must be positive ints, got {batch_sizes!r}")
        self.pad_batches = self.device.type == "cuda" if pad_batches is None else pad_batches
        self.warmed_up: Tuple[int, ...] = ()
        self._lock = threading.Lock()  # one forward at a time: a CUDA graph replays into fixed buffers

    @classmethod
    def load(cls, model: str = "s", weights=None, *, pretrained: Union[bool, str] = True, device=None, dtype=None,
             progress: Optional[Callable[[str], None]] = say, **kwargs) -> "Classifier":
        """``fastmvit.load(model, weights)`` on ``device`` in ``dtype`` (auto: float16 on a GPU): the fused
        engine on a GPU, with CUDA graphs at the warmed-up batch sizes. ``kwargs`` go to ``Classifier``.
        ``progress`` is told what is loading (default: a line on stderr; None for silence)."""
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        from ..segmentation import is_segmentation_name, segmentation_variant

        if is_segmentation_name(model):
            segmentation_variant(model)  # a bad name fails here, before any progress line
        else:
            model = get_variant(model).name
        start = time.perf_counter()
        what = f"weights {weights}" if weights is not None else ("random weights" if not pretrained else
                                                                  "pretrained weights")
        if progress:
            progress(f"loading {model} ({what}) on {dev}, {str(dt).replace('torch.', '')}")
        net = _load_fn()(model, weights, pretrained=pretrained,
                         num_classes=None if weights is not None else 1000, device=dev, dtype=dt,
                         backend="auto", cuda_graphs=True)
        if progress:
            progress(f"loaded {model} in {time.perf_counter() - start:.1f} s")
        if cls is Classifier and getattr(net, "task", None) == "segmentation":
            cls = Segmenter  # a segmentation name, or a DeepLabV3 checkpoint under its backbone's name
        return cls(net, **kwargs)

    @property
    def image_shape(self) -> Tuple[int, int, int]:
        return self.decoder.image_shape

    @property
    def max_batch_size(self) -> int:
        return self.batch_sizes[-1]

    def padded_size(self, n: int) -> int:
        """The batch size a batch of ``n`` runs at."""
        if not self.pad_batches:
            return n
        return next((b for b in self.batch_sizes if b >= n), n)

    @torch.inference_mode()
    def forward(self, images: Union[torch.Tensor, np.ndarray]) -> torch.Tensor:
        x = torch.as_tensor(images)
        self._check_batch(x)
        chunks = x.split(self.max_batch_size) if x.shape[0] > self.max_batch_size else [x]
        return torch.cat([self._forward_chunk(c) for c in chunks])

    def _check_batch(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or tuple(x.shape[1:]) != self.image_shape:
            raise InputError(f"expected images [B, {', '.join(map(str, self.image_shape))}], got {list(x.shape)}")

    def _forward_chunk(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        size = self.padded_size(n)
        x = x.to(self.device, non_blocking=True)
        if size > n:
            x = torch.cat([x, x.new_zeros((size - n,) + tuple(x.shape[1:]))])
        with self._lock:
            return self._keep(self.model(x.to(self.dtype))[:n])

    def _keep(self, out: torch.Tensor) -> torch.Tensor:
        """The forward's output as the caller gets it, copied out of buffers a CUDA graph replays into."""
        return out.float().cpu()

    def warmup(self, progress: Optional[Callable[[str], None]] = say) -> Tuple[int, ...]:
        """Run one forward at every batch size, so the first requests find every kernel compiled, every
        oneDNN/cuDNN plan chosen and (with the fused engine) every CUDA graph captured. On a GPU the
        kernels are first compiled in parallel over all cores (``fastmvit.engine.warmup``). ``progress`` is
        told each step as it starts and when all are done (default: a line on stderr; None for silence):
        a warm-up takes seconds to minutes, and a server that prints nothing meanwhile looks hung."""
        start = time.perf_counter()
        if self.device.type == "cuda" and getattr(self.model, "backend", "torch") != "torch":
            if progress:
                progress("warm-up: compiling the engine's kernels in parallel")
            _parallel_kernel_warmup(self.model, self.batch_sizes, self.image_shape[1:])
        work = self._warmup_work()
        for i, b in enumerate(self.batch_sizes, 1):
            if progress:
                progress(f"warm-up {i}/{len(self.batch_sizes)}: batch {b} ({work}), "
                         f"{time.perf_counter() - start:.1f} s so far")
            self.forward(torch.full((b,) + self.image_shape, 0.5))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.warmed_up = self.batch_sizes
        if progress:
            progress(f"ready: warm-up of batch sizes {', '.join(map(str, self.batch_sizes))} took "
                     f"{time.perf_counter() - start:.1f} s")
        return self.warmed_up

    def _warmup_work(self) -> str:
        """What the warm-up forwards spend their time on here, for the progress lines."""
        if self.device.type == "cuda":
            return "capturing CUDA graphs"
        from ..engine import FUSED, TORCH, choose_engine

        if hasattr(self.model, "cpu_engine_runtimes"):  # a classifier: its CPU engine may run (not DeepLabV3)
            which = choose_engine(getattr(self.model, "backend", "torch"), torch.empty(0, dtype=self.dtype))
            if which not in (TORCH, FUSED):
                return ("building the CPU engine: ONNX export and the runtime choice at the first batch size, a "
                        "graph per batch size")
        return "choosing the CPU kernels"

    def top_k(self, logits: torch.Tensor, k: int) -> List[List[dict]]:
        """``[[{"label", "index", "score"}, ...]]``: softmax probabilities of the ``k`` best classes per row."""
        return topk(logits, k, self.labels)


class Segmenter(Classifier):
    """A segmentation model (DeepLabV3) behind a server: whole images in, a mask per image out.

    ``decoder`` is a ``SegmentationDecoder``: each request's image arrives resized so its shorter side is
    the input size S, with its own size beside it. ``forward`` takes ``[B, 3, h, w]`` float32 of one shape
    (warm-up runs S x S) and returns the logits ``[B, C, h/os, w/os]`` float32, left on the model's device so
    ``labels_of`` resizes them there. ``labels_of(logits, size)`` is the label map ``[H, W]`` at the image's
    own size (``fastmvit.masks.label_map``: bilinear as the checkpoint's source does, resized a class at a
    time when large, so memory stays bounded); ``answer`` adds the mask PNG and each class's share of
    pixels. ``labels`` are the class names, by index.
    """

    task = "segmentation"

    def __init__(self, model: torch.nn.Module, **kwargs):
        super().__init__(model, **kwargs)
        self.decoder = SegmentationDecoder(self.decoder.cfg, self.decoder.limits)
        self.labels = list(self.labels) if self.labels else [str(i) for i in range(self.num_classes)]
        self.align_corners = bool(model.pretrained_cfg.get("upsample_align_corners", False))
        self.label_dtype = torch.uint8 if self.num_classes <= 256 else torch.int32

    def _check_batch(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != 3:
            raise InputError(f"expected images [B, 3, H, W], got {list(x.shape)}")

    def _keep(self, out: torch.Tensor) -> torch.Tensor:
        return out.to(torch.float32, copy=True)  # stays on the device: labels_of() resizes it there

    @torch.inference_mode()
    def labels_of(self, logits: torch.Tensor, size: Tuple[int, int]) -> np.ndarray:
        """One image's logits ``[C, h, w]`` -> its label map ``[H, W]`` (uint8 below 256 classes)."""
        return label_map(logits[None], size=tuple(size), align_corners=self.align_corners,
                         dtype=self.label_dtype)[0].cpu().numpy()

    def classes_in(self, labels: np.ndarray) -> List[dict]:
        """``[{"label", "index", "share"}]`` of the classes present, largest share of pixels first."""
        counts = np.bincount(labels.ravel(), minlength=self.num_classes)
        total = max(1, labels.size)
        present = sorted((int(i) for i in np.flatnonzero(counts)), key=lambda i: (-counts[i], i))
        return [{"label": self.labels[i], "index": i, "share": float(counts[i]) / total} for i in present]

    def answer(self, logits: torch.Tensor, size: Tuple[int, int]) -> Tuple[bytes, List[dict]]:
        """(mask PNG of class indices at ``size``, the classes present with their shares)."""
        labels = self.labels_of(logits, size)
        return mask_png(labels), self.classes_in(labels)
