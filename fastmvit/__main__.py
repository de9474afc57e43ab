"""Command line: ``python -m fastmvit {predict,info,bench,serve} ...``."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from .errors import FastMViTError


def _predict(args) -> int:
    import torch

    from . import load
    from .preprocess import imagenet_classes, preprocess, topk

    model = load(args.model, args.weights, pretrained=not args.random, num_classes=None if args.weights else 1000)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device)
    cfg = model.pretrained_cfg["preprocess"]
    labels = model.pretrained_cfg.get("labels")
    labels = imagenet_classes() if labels == "imagenet-1k" else labels
    batch = preprocess(list(args.images), cfg).to(device)
    with torch.inference_mode():
        logits = model(batch)
    for path, top in zip(args.images, topk(logits, args.top, labels)):
        print(path)
        for t in top:
            print(f"  {t['score']:6.2%}  {t['label']}  ({t['index']})")
    return 0


def _info(args) -> int:
    if args.plan:
        from .engine.plan_info import main as plan_main

        return plan_main(args.plan, args.batch, args.size, args.dtype, args.resources)
    from .info import collect_info, format_info

    print(format_info(collect_info()))
    return 0


def _bench(argv: List[str]) -> int:
    from .benchmark import main as bench_main

    return bench_main(argv)


def _serve(argv: List[str]) -> int:
    from .serving.cli import main as serve_main

    return serve_main(argv)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # bench and serve own their options
    if argv and argv[0] in ("bench", "serve"):
        return {"bench": _bench, "serve": _serve}[argv[0]](argv[1:])

    parser = argparse.ArgumentParser(prog="python -m fastmvit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("predict", help="classify images and print the top classes")
    p.add_argument("images", nargs="+", help="image files (JPEG, PNG, ...)")
    p.add_argument("--model", default="s", help="variant: xxs, xs, s, v2-0.5 ... v2-2.0, or a timm name")
    p.add_argument("--weights", help="checkpoint file or Hugging Face directory (default: pretrained)")
    p.add_argument("--random", action="store_true", help="random weights (no download); for smoke tests")
    p.add_argument("--top", type=int, default=5, help="how many classes to print (default 5)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.set_defaults(func=_predict)
    p = sub.add_parser("info", help="versions, devices, compiled extension and kernel backends")
    p.add_argument("--plan", metavar="MODEL", help="instead: every kernel the engine launches for MODEL on a GPU "
                   "(grid, serial steps, latency floor, the fuse rule's estimates); no GPU needed")
    p.add_argument("--batch", type=int, default=1, help="with --plan (default 1)")
    p.add_argument("--size", type=int, default=256, help="with --plan: image side (default 256)")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"], help="with --plan")
    p.add_argument("--resources", action="store_true", help="with --plan: compile each kernel for sm_90 and show "
                   "registers and occupancy (a few seconds per kernel)")
    p.set_defaults(func=_info)
    sub.add_parser("bench", help="compare fastmvit with eager PyTorch on this device (see bench --help)")
    sub.add_parser("serve", help="serve a model over HTTP with LitServe (see serve --help)")
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except FastMViTError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
