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
    if getattr(model, "task", None) == "segmentation":
        from .masks import print_written_masks

        return print_written_masks(model, args.images, args.out_dir)
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
    p = sub.add_parser("predict", help="classify images and print the top classes (segmentation models: "
                                       "write label masks and colour overlays)")
    p.add_argument("images", nargs="+", help="image files (JPEG, PNG, ...)")
    p.add_argument("--model", default="s", help="variant: xxs, xs, s, v2-0.5 ... v2-2.0, a timm name, "
                                                  "or a segmentation model: deeplabv3-s, ...")
    p.add_argument("--weights", help="checkpoint file or Hugging Face directory (default: pretrained)")
    p.add_argument("--random", action="store_true", help="random weights (no download); for smoke tests")
    p.add_argument("--top", type=int, default=5, help="how many classes to print (default 5)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--out-dir", help="segmentation models (--model deeplabv3-s, ...): where to write "
                                     "<image>_mask.png and <image>_overlay.png (default: beside each image)")
    p.set_defaults(func=_predict)
    p = sub.add_parser("info", help="versions, devices, compiled extension and kernel backends")
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
