<<<<<<< HEAD
"""Command line: ``python -m fastmvit {predict,info,bench,serve,warmup} ...``."""
=======
"""Command line: ``python -m fastmvit {predict,evaluate,info,bench,serve} ...``."""
>>>>>>> offline-batch
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from .errors import FastMViTError, message_for


<<<<<<< HEAD
def _predict(args) -> int:
    import torch

    from . import load
    from .api import parse_device
    from .preprocess import imagenet_classes, preprocess, topk

    device = parse_device(args.device)
    model = load(args.model, args.weights, pretrained=not args.random, num_classes=None if args.weights else 1000)
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


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


=======
>>>>>>> offline-batch
def _info(args) -> int:
    from .info import collect_info, format_info

    print(format_info(collect_info()))
    return 0


def _bench(argv: List[str]) -> int:
    from .benchmark import main as bench_main

    return bench_main(argv)


def _warmup(argv: List[str]) -> int:
    from .engine.warmup import main as warmup_main

    return warmup_main(argv)


def _serve(argv: List[str]) -> int:
    from .serving.cli import main as serve_main

    return serve_main(argv)


def _offline(argv: List[str], command: str) -> int:
    from .offline import cli

    return (cli.predict_main if command == "predict" else cli.evaluate_main)(argv)


def main(argv: Optional[List[str]] = None) -> int:
    """Run one command. Every command reports a fastmvit error the same way: ``error: ...`` on stderr,
    with the remedy in the command line's terms, and exit status 2 (as argparse does for bad options)."""
    argv = list(sys.argv[1:] if argv is None else argv)
<<<<<<< HEAD
    try:
        return _run(argv)
    except FastMViTError as e:
        print(f"error: {message_for(e, 'cli')}", file=sys.stderr)
        return 2
=======
    # bench, serve and the offline jobs own their options
    if argv and argv[0] in ("bench", "serve"):
        return {"bench": _bench, "serve": _serve}[argv[0]](argv[1:])
    if argv and argv[0] in ("predict", "evaluate"):
        return _offline(argv[1:], argv[0])
>>>>>>> offline-batch


def _run(argv: List[str]) -> int:
    # bench and serve own their options
    if argv and argv[0] in ("bench", "serve", "warmup"):
        return {"bench": _bench, "serve": _serve, "warmup": _warmup}[argv[0]](argv[1:])

    parser = argparse.ArgumentParser(prog="python -m fastmvit",
                                     description="fastmvit: MobileViT inference. Every command takes --help.")
    sub = parser.add_subparsers(dest="command", required=True)
<<<<<<< HEAD
    p = sub.add_parser("predict", help="classify images and print the top classes")
    p.add_argument("images", nargs="+", help="image files (JPEG, PNG, ...)")
    p.add_argument("--model", default="s", help="variant: xxs, xs, s, v2-0.5 ... v2-2.0, or a timm name")
    p.add_argument("--weights", help="checkpoint file or Hugging Face directory (default: pretrained)")
    p.add_argument("--random", action="store_true", help="random weights (no download); for smoke tests")
    p.add_argument("--top", type=_positive_int, default=5, help="how many classes to print (default 5)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.set_defaults(func=_predict)
=======
    sub.add_parser("predict", help="classify image files, folders, globs or lists; JSONL/CSV out (see predict --help)")
    sub.add_parser("evaluate", help="top-1/top-5 accuracy on an ImageFolder tree or a labelled list (see evaluate --help)")
>>>>>>> offline-batch
    p = sub.add_parser("info", help="versions, devices, compiled extension and kernel backends")
    p.set_defaults(func=_info)
    sub.add_parser("bench", help="compare fastmvit with eager PyTorch on this device (see bench --help)")
    sub.add_parser("serve", help="serve a model over HTTP with LitServe (see serve --help)")
    sub.add_parser("warmup", help="compile a model's Triton kernels in parallel before the first forward "
                                  "(see warmup --help)")
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
