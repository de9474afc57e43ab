"""Throughput of batch prediction over a generated folder of small JPEGs: 0, 1, 2 ... decode workers, and
the same job on a local Ray cluster. Random weights (no download).

    python bench/offline_throughput.py --images 2000 --model xxs --workers 0,1,2 --ray

Prints one row per configuration: images/s, and where the time went (model, waiting for decoded images,
decoding summed over the workers). Takes CPU timings as they come: note the machine's load beside them.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

import numpy as np
import torch

import fastmvit
from fastmvit.model.random import randomize_
from fastmvit.offline import BatchPredictor, find_images


def make_folder(root: str, n: int, seed: int = 0) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(n):
        h, w = rng.integers(96, 200, 2)
        base = rng.random(3) * 255
        arr = np.clip(base + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
        sub = os.path.join(root, f"d{i % 20:02d}")
        os.makedirs(sub, exist_ok=True)
        Image.fromarray(arr).save(os.path.join(sub, f"{i:05d}.jpg"), quality=90)


def run(predictor: BatchPredictor, paths, ray_kwargs=None) -> dict:
    if ray_kwargs is None:
        batches = predictor(paths)
    else:
        from fastmvit.offline.ray_data import ray_predictions

        batches = ray_predictions(predictor, paths, **ray_kwargs)
    n = 0
    for b in batches:
        n += len(b.paths)
    s = predictor.stats
    assert n == len(paths) == s.done
    return dict(images_per_s=s.images_per_s, wall_s=s.wall_s, model_s=s.model_s, wait_s=s.wait_s, decode_s=s.decode_s)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--model", default="xxs")
    p.add_argument("--input-size", type=int, default=None, help="default: the model's (256)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", default="0,1,2")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads in the model loop")
    p.add_argument("--ray", action="store_true", help="also run on a local Ray cluster")
    p.add_argument("--folder", help="reuse this folder instead of generating one")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        weights = os.path.join(tmp, "w.safetensors")
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in randomize_(fastmvit.load(args.model, pretrained=False)).state_dict().items()},
                  weights)
        folder = args.folder or os.path.join(tmp, "images")
        if not args.folder:
            t0 = time.perf_counter()
            make_folder(folder, args.images)
            print(f"generated {args.images} JPEGs in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        paths = find_images(folder)
        model = fastmvit.load(args.model, weights)
        print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.node()}, {os.cpu_count()} cores, "
              f"load {os.getloadavg()[0]:.1f}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
              f"fastmvit {fastmvit.__version__}; {args.model} at {args.input_size or 256}px, {len(paths)} images, "
              f"batch {args.batch_size}")
        print("| run | images/s | wall s | model s | waited for data s | decode s (summed) | load before |")
        print("|---|---|---|---|---|---|---|")
        configs = [("workers", int(w)) for w in args.workers.split(",")] + ([("ray", 1)] if args.ray else [])
        for kind, w in configs:
            load = os.getloadavg()[0]
            predictor = BatchPredictor(model, batch_size=args.batch_size, num_workers=w if kind == "workers" else 0,
                                       input_size=args.input_size)
            r = run(predictor, paths, None if kind == "workers" else
                    dict(model=args.model, weights=weights, address=None, actors=1, device="cpu"))
            name = f"{w} workers" if kind == "workers" else "local Ray (decode tasks + 1 model actor)"
            print(f"| {name} | {r['images_per_s']:.1f} | {r['wall_s']:.1f} | {r['model_s']:.1f} | {r['wait_s']:.1f} | "
                  f"{r['decode_s']:.1f} | {load:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
