"""Command line: ``python -m fastmvit {predict,evaluate,info,bench,serve,warmup} ...``."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from .errors import FastMViTError, message_for


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
    try:
        return _run(argv)
    except FastMViTError as e:
        print(f"error: {message_for(e, 'cli')}", file=sys.stderr)
        return 2


def _run(argv: List[str]) -> int:
    # bench, serve, warmup and the offline jobs own their options
    if argv and argv[0] in ("bench", "serve", "warmup"):
        return {"bench": _bench, "serve": _serve, "warmup": _warmup}[argv[0]](argv[1:])
    if argv and argv[0] in ("predict", "evaluate"):
        return _offline(argv[1:], argv[0])

    parser = argparse.ArgumentParser(prog="python -m fastmvit",
                                     description="fastmvit: MobileViT inference. Every command takes --help.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("predict", help="classify image files, folders, globs or lists; JSONL/CSV out (see predict --help)")
    sub.add_parser("evaluate", help="top-1/top-5 accuracy on an ImageFolder tree or a labelled list (see evaluate --help)")
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
    sub.add_parser("warmup", help="compile a model's Triton kernels in parallel before the first forward "
                                  "(see warmup --help)")
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
