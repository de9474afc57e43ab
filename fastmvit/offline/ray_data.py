"""Ray Data integration: the same job as ``BatchPredictor``, with decoding in Ray tasks and the model in
Ray actors (one model each, a GPU each where there are GPUs), on a local or remote Ray cluster.

    import ray, fastmvit.offline.ray_data as frd
    ds = ray.data.from_items([{"path": p} for p in paths])
    ds = ds.map_batches(frd.decode_images, batch_size=64, fn_kwargs=frd.decode_kwargs(preprocess_cfg))
    ds = ds.map_batches(frd.FastMViTPredictor, batch_size=64, concurrency=4, num_gpus=1,
                        fn_constructor_kwargs={"model": "s"})
    # columns: path, error ("" when decoded), logits [n, C] (NaN rows for skipped files), decode_s, model_s

Ray does the distribution; nothing here schedules work by hand. ``ray_predictions`` runs that pipeline
and hands back ``PredictionBatch`` es in input order, so ``predict --ray`` writes the very file the
single-process job writes.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Dict, Iterator, Optional, Sequence

import numpy as np
import torch

from ..errors import FastMViTError
from ..preprocess import PreprocessConfig
from ..serving.common import ImageDecoder, InputLimits
from .decode import decode_file
from .predict import BatchPredictor, PredictionBatch

__all__ = ["decode_images", "decode_kwargs", "FastMViTPredictor", "ray_predictions"]


def decode_kwargs(cfg: PreprocessConfig, limits: InputLimits = InputLimits()) -> dict:
    """``fn_kwargs`` for ``decode_images``: plain dicts, so they travel to any node."""
    return {"preprocess": dataclasses.asdict(cfg), "limits": dataclasses.asdict(limits)}


def decode_images(batch: Dict[str, np.ndarray], preprocess: dict, limits: dict) -> Dict[str, np.ndarray]:
    """``map_batches`` function (a stateless Ray task): ``path`` -> ``pixels`` ``[n, 3, S, S]`` float32
    (zeros for a file that could not be decoded) and ``error`` ("" when decoded, else why not)."""
    decoder = ImageDecoder(PreprocessConfig(**preprocess), InputLimits(**limits))
    paths = [str(p) for p in batch["path"]]
    pixels = np.zeros((len(paths),) + decoder.image_shape, np.float32)
    errors, seconds = [], []
    for j, path in enumerate(paths):
        t0 = time.perf_counter()
        arr, error = decode_file(path, decoder)
        if error is None:
            pixels[j] = arr
        errors.append(error or "")
        seconds.append(time.perf_counter() - t0)
    out = dict(batch)
    out.update(pixels=pixels, error=np.array(errors, dtype=object), decode_s=np.array(seconds))
    return out


class FastMViTPredictor:
    """``map_batches`` class (a Ray actor): one fastmvit model per actor, loaded once, on the actor's GPU
    when Ray gave it one (``num_gpus=1``), else on its CPUs. Takes ``pixels`` and ``error`` columns (from
    ``decode_images``) and adds ``logits`` (float32, NaN rows for skipped files), ``features`` when asked
    for, and ``model_s``."""

    def __init__(self, model: str = "s", weights: Optional[str] = None, *, pretrained=True, features: bool = False,
                 device: str = "auto", dtype: str = "auto"):
        from .. import load
        from ..serving.common import resolve_device, resolve_dtype

        dev = resolve_device(device)
        net = load(model, weights, pretrained=pretrained, num_classes=None if weights else 1000, device=dev,
                   dtype=resolve_dtype(dtype, dev), backend="auto")
        self.predictor = BatchPredictor(net, num_workers=0, features=features)
        self.num_classes = net.num_classes

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        t0 = time.perf_counter()
        ok = torch.tensor([e == "" for e in batch["error"]], dtype=torch.bool)
        logits, features = self.predictor.finish(*self.predictor.launch(torch.from_numpy(batch["pixels"]), ok))
        out = {k: v for k, v in batch.items() if k != "pixels"}  # pixels are not sent back
        full = np.full((len(ok), self.num_classes), np.nan, np.float32)
        full[ok.numpy()] = logits.numpy()
        out["logits"] = full
        if features is not None:
            f = np.full((len(ok), features.shape[1]), np.nan, np.float32)
            f[ok.numpy()] = features.numpy()
            out["features"] = f
        out["model_s"] = np.full(len(ok), (time.perf_counter() - t0) / max(len(ok), 1))
        return out


def _init_ray(address: Optional[str]) -> bool:
    """Connect to ``address`` (None: start a local cluster with this machine's CPUs and GPUs); True when
    this call started Ray and should shut it down."""
    try:
        import ray
    except ImportError:
        raise FastMViTError("--ray needs Ray Data: pip install 'fastmvit[ray]'") from None
    if ray.is_initialized():
        return False
    kwargs = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
    if address is None:
        ray.init(num_cpus=os.cpu_count(), **kwargs)
    else:
        try:
            ray.init(address=address, **kwargs)
        except ConnectionError as e:
            raise FastMViTError(f"cannot connect to the Ray cluster at {address!r}: {e}") from None
    return True


def ray_predictions(predictor: BatchPredictor, paths: Sequence[str], *, model: str, weights: Optional[str] = None,
                    pretrained=True, address: Optional[str] = None, actors: int = 1, device: str = "auto",
                    dtype: str = "auto") -> Iterator[PredictionBatch]:
    """Run ``predictor``'s job on Ray: the same files, batch size, preprocessing, top-k and features, the
    model rebuilt in each actor from ``model`` / ``weights``; yields ``PredictionBatch`` es in input order and
    fills ``predictor.stats``. ``actors`` model replicas; on a cluster with GPUs each takes one."""
    import ray

    from .predict import RunStats

    if not isinstance(actors, int) or actors < 1:
        raise FastMViTError(f"the number of Ray actors must be a positive int, got {actors!r}")
    stats = predictor.stats = RunStats(total=len(paths), decoded_by="Ray tasks; model time summed over the actors")
    if not paths:
        return
    started = _init_ray(address)
    start = time.perf_counter()
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # input order out, like the single-process job
        ctx.enable_progress_bars = False  # fastmvit prints its own progress and summary
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        b = predictor.batch_size
        ds = ray.data.from_items([{"path": p, "position": i} for i, p in enumerate(paths)])
        ds = ds.map_batches(decode_images, batch_size=b, batch_format="numpy",
                            fn_kwargs=decode_kwargs(predictor.decoder.cfg, predictor.decoder.limits))
        ds = ds.map_batches(FastMViTPredictor, batch_size=b, batch_format="numpy", concurrency=actors,
                            num_gpus=gpus, fn_constructor_kwargs=dict(
                                model=model, weights=weights, pretrained=pretrained,
                                features=predictor.headless is not None, device=device, dtype=dtype))
        for rb in ds.iter_batches(batch_size=b, batch_format="numpy"):
            errors = [e or None for e in rb["error"]]
            ok = np.array([e is None for e in errors], dtype=bool)
            features = torch.from_numpy(rb["features"][ok]) if "features" in rb else None
            result = predictor.make_batch([str(p) for p in rb["path"]], [int(i) for i in rb["position"]], errors,
                                          torch.from_numpy(np.ascontiguousarray(rb["logits"][ok])), features)
            stats.done += len(result.paths)
            stats.skipped += len(result.errors)
            stats.errors.extend(result.errors)
            stats.decode_s += float(rb["decode_s"].sum())
            stats.model_s += float(rb["model_s"].sum())
            stats.wall_s = time.perf_counter() - start
            yield result
    finally:
        stats.wall_s = time.perf_counter() - start
        if started:
            ray.shutdown()
