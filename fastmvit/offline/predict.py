"""The Python API under every offline job: ``BatchPredictor(model)(paths)`` yields one ``PredictionBatch``
per fixed-size batch, in input order, with the files that could not be read reported beside the results.

Decoding runs in DataLoader worker processes; on a GPU the batches arrive in pinned memory, are copied
asynchronously, and batch ``i``'s results are fetched only after batch ``i + 1`` was launched, so the GPU
is kept busy while the next batch is collected.
"""
from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from ..errors import InputError
from ..preprocess import PreprocessConfig, imagenet_classes, topk
from ..serving.common import ImageDecoder, InputLimits, scaled_preprocess
from .decode import DecodedBatch, ImageFiles, collate
from .sources import find_images

__all__ = ["BatchPredictor", "PredictionBatch", "RunStats", "iter_predictions", "default_num_workers"]


def default_num_workers() -> int:
    """Decode workers when none are asked for: every core but one (which runs the model loop), up to 8."""
    return max(1, min(8, (os.cpu_count() or 2) - 1))


@dataclass
class PredictionBatch:
    """One batch's results. ``paths[j]``'s answer is ``predictions[j]`` (top-k ``{"label", "index",
    "score"}``, best first), ``logits[j]`` and, when asked for, ``features[j]`` (pooled features)."""

    paths: List[str]
    predictions: List[List[dict]]
    logits: torch.Tensor                       # [n, num_classes] float32, CPU
    features: Optional[torch.Tensor]           # [n, num_features] float32, CPU; None unless asked for
    errors: List[Tuple[str, str]]              # the batch's files that were skipped: (path, why)
    positions: List[int]                       # each path's index in the job's path list
    error_positions: List[int]

    def __iter__(self):  # `for paths, predictions in predictor(...)`
        return iter((self.paths, self.predictions))

    def records(self) -> Iterator[dict]:
        """One dict per file, in input order: ``{"path", "labels", "indices", "scores"}`` or
        ``{"path", "error"}``; ``"row"`` is the image's row in ``features``."""
        merged = [(pos, "ok", j) for j, pos in enumerate(self.positions)]
        merged += [(pos, "error", j) for j, pos in enumerate(self.error_positions)]
        for _, kind, j in sorted(merged):
            if kind == "error":
                path, why = self.errors[j]
                yield {"path": path, "error": why}
            else:
                top = self.predictions[j]
                yield {"path": self.paths[j], "labels": [t["label"] for t in top],
                       "indices": [t["index"] for t in top], "scores": [t["score"] for t in top], "row": j}


@dataclass
class RunStats:
    """What a job did and where its time went. ``decode_s`` is summed over the workers (they run in
    parallel); ``wait_s`` is how long the model loop waited for decoded batches; ``model_s`` how long it
    spent in the model (launch, and on a GPU the wait for results)."""

    total: int = 0
    done: int = 0
    skipped: int = 0
    wall_s: float = 0.0
    decode_s: float = 0.0
    wait_s: float = 0.0
    model_s: float = 0.0
    workers: int = 0
    decoded_by: str = ""  # who decoded, when not this process's DataLoader workers (e.g. "Ray tasks")
    errors: List[Tuple[str, str]] = field(default_factory=list)

    @property
    def images_per_s(self) -> float:
        return self.done / self.wall_s if self.wall_s > 0 else 0.0

    def _workers(self) -> str:
        return {0: "the main process (no workers)", 1: "1 worker"}.get(self.workers, f"{self.workers} workers")

    @property
    def bound(self) -> str:
        """"decode" when the model loop waited for data longer than it computed, else "model"."""
        return "decode" if self.wait_s > self.model_s else "model"

    def summary(self) -> str:
        lines = [f"{self.done} images classified, {self.skipped} skipped, of {self.total}, in {self.wall_s:.1f} s "
                 f"({self.images_per_s:.1f} images/s)",
                 f"time: model {self.model_s:.1f} s; waiting for decoded images {self.wait_s:.1f} s; decoding "
                 f"{self.decode_s:.1f} s summed over {self.decoded_by or self._workers()}",
                 ]
        if not self.decoded_by:  # the model loop's own waits say it; on Ray the cluster's dashboard does
            lines.append(f"bound by: {self.bound}" + (" (more --workers may help)" if self.bound == "decode" else ""))
        if self.errors:
            lines.append(f"skipped {len(self.errors)} file{'s' if len(self.errors) > 1 else ''}:")
            lines += [f"  {p}: {why}" for p, why in self.errors[:20]]
            if len(self.errors) > 20:
                lines.append(f"  ... and {len(self.errors) - 20} more (the output has every one)")
        return "\n".join(lines)


def _headless_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The same network without its classifier: forward returns pooled features, on the same engine."""
    from ..model import MobileViT

    p = next(model.parameters())
    headless = MobileViT(model.variant, 0)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("head.fc.")}
    headless.load_state_dict(state, strict=True)
    headless.set_numerics(model.numerics)
    headless.backend = model.backend
    headless.cuda_graph_max_batch = model.cuda_graph_max_batch
    headless.requires_grad_(False)
    return headless.to(device=p.device, dtype=p.dtype)


class BatchPredictor:
    """Classify image files in fixed-size batches with ``model`` (a ``fastmvit.load()`` model, on the
    device and in the dtype it should run in).

        predictor = BatchPredictor(model, batch_size=64, num_workers=4, top_k=5)
        for batch in predictor(find_images(["photos/"])):
            batch.paths, batch.predictions, batch.errors
        print(predictor.stats.summary())

    Each batch holds ``batch_size`` files (the last one fewer); a file that cannot be read or decoded is
    reported in ``errors`` and takes no place in the results. ``features=True`` adds pooled features (the
    classifier's input).
    """

    def __init__(self, model: torch.nn.Module, *, batch_size: int = 64, num_workers: Optional[int] = None,
                 top_k: int = 5, features: bool = False, input_size: Optional[int] = None,
                 limits: InputLimits = InputLimits()):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size must be a positive int, got {batch_size!r}")
        if num_workers is not None and (not isinstance(num_workers, int) or num_workers < 0):
            raise InputError(f"num_workers must be an int >= 0 (0 decodes in this process), got {num_workers!r}")
        if not isinstance(top_k, int) or top_k < 1:
            raise InputError(f"top_k must be a positive int, got {top_k!r}")
        if getattr(model, "num_classes", 0) == 0:
            raise InputError("the model has no classifier head (num_classes=0); load it with its head and ask for "
                             "features=True to get pooled features too")
        p = next(model.parameters())
        self.model, self.device, self.dtype = model, p.device, p.dtype
        self.batch_size = batch_size
        self.num_workers = default_num_workers() if num_workers is None else num_workers
        self.top_k = min(top_k, model.num_classes)
        cfg = model.pretrained_cfg.get("preprocess") or PreprocessConfig()
        self.decoder = ImageDecoder(scaled_preprocess(cfg, input_size), limits)
        labels = model.pretrained_cfg.get("labels")
        self.labels: Optional[List[str]] = imagenet_classes() if labels == "imagenet-1k" else labels
        self.headless = _headless_copy(model) if features else None
        self.stats = RunStats()

    @property
    def image_shape(self) -> Tuple[int, int, int]:
        return self.decoder.image_shape

    # ---------------------------------------------------------------------------------------------
    # The model step, shared with the Ray predictor

    @torch.inference_mode()
    def launch(self, pixels: torch.Tensor, ok: torch.Tensor):
        """Start the forward of one batch of slots; returns what ``finish`` needs. On a GPU the whole batch
        runs (one shape, one CUDA graph or kernel plan) and bad slots are dropped afterwards; on the CPU
        only the good slots are computed."""
        n_ok = int(ok.sum())
        if n_ok == 0:
            return None, None, ok, True
        x = pixels.to(self.device, non_blocking=True)
        selected = False
        if self.device.type != "cuda" and n_ok < len(ok):
            x, selected = x[ok], True
        x = x.to(self.dtype)
        if self.headless is not None:
            features = self.headless(x)
            logits = self.model.head.fc(features)
        else:
            features, logits = None, self.model(x)
        return logits, features, ok, selected

    def finish(self, logits, features, ok, selected) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Wait for a launched batch; its logits (and features) of the good slots, float32 on the CPU."""
        if logits is None:
            empty = torch.empty(0, self.model.num_classes)
            return empty, (torch.empty(0, self.model.variant.num_features) if self.headless is not None else None)
        logits = logits.float().cpu()
        features = features.float().cpu() if features is not None else None
        if not selected and logits.shape[0] != int(ok.sum()):
            logits = logits[ok]
            features = features[ok] if features is not None else None
        return logits, features

    def make_batch(self, paths: Sequence[str], positions: Sequence[int], errors: Sequence[Optional[str]],
                   logits: torch.Tensor, features: Optional[torch.Tensor]) -> PredictionBatch:
        """Results of one batch of slots (``errors[j]`` None for a decoded slot) as a PredictionBatch."""
        good = [j for j, e in enumerate(errors) if e is None]
        bad = [j for j, e in enumerate(errors) if e is not None]
        preds = topk(logits, self.top_k, self.labels) if len(good) else []
        return PredictionBatch([paths[j] for j in good], preds, logits, features,
                               [(paths[j], errors[j]) for j in bad], [positions[j] for j in good],
                               [positions[j] for j in bad])

    # ---------------------------------------------------------------------------------------------
    def __call__(self, paths: Union[str, os.PathLike, Sequence[str]]) -> Iterator[PredictionBatch]:
        """Yield the batches' results in input order. A folder, pattern or list file is expanded with
        ``find_images``; a sequence is taken as the exact list of files."""
        paths = find_images(paths) if isinstance(paths, (str, os.PathLike)) else [os.fspath(p) for p in paths]
        self.stats = stats = RunStats(total=len(paths), workers=self.num_workers)
        if not paths:
            return
        loader = torch.utils.data.DataLoader(
            ImageFiles(paths, self.decoder), batch_size=self.batch_size, shuffle=False,
            num_workers=self.num_workers,
            collate_fn=functools.partial(collate, shape=self.image_shape, dtype=self.dtype),
            pin_memory=self.device.type == "cuda", prefetch_factor=4 if self.num_workers else None)
        start = time.perf_counter()
        batches = iter(loader)
        pending: Optional[Tuple[DecodedBatch, tuple]] = None
        try:
            while True:
                t0 = time.perf_counter()
                batch: Optional[DecodedBatch] = next(batches, None)
                t1 = time.perf_counter()
                stats.wait_s += t1 - t0
                launched = None
                if batch is not None:
                    stats.decode_s += batch.decode_seconds
                    launched = (batch, self.launch(batch.pixels, batch.ok))
                    stats.model_s += time.perf_counter() - t1
                if pending is not None:  # the previous batch, finished only now: the GPU had the next one queued
                    t2 = time.perf_counter()
                    done, handles = pending
                    logits, features = self.finish(*handles)
                    stats.model_s += time.perf_counter() - t2
                    result = self.make_batch([paths[i] for i in done.positions], done.positions, done.errors,
                                             logits, features)
                    stats.done += len(result.paths)
                    stats.skipped += len(result.errors)
                    stats.errors.extend(result.errors)
                    stats.wall_s = time.perf_counter() - start
                    yield result
                pending = launched
                if batch is None:
                    break
        finally:
            stats.wall_s = time.perf_counter() - start
            del batches  # shuts the workers down, also when the caller stops early


def iter_predictions(model: torch.nn.Module, paths, **kwargs) -> Iterator[PredictionBatch]:
    """``BatchPredictor(model, **kwargs)(paths)``: an iterator over ``PredictionBatch`` (unpacks as
    ``paths, predictions``)."""
    return BatchPredictor(model, **kwargs)(paths)
