"""``python -m fastmvit predict`` and ``python -m fastmvit evaluate``: offline jobs over image files.

    python -m fastmvit predict photos/ --model s --output preds.jsonl [--features feats.npy] [--resume]
    python -m fastmvit predict "bucket/**/*.jpg" list.txt --output preds.csv --ray [ADDRESS]
    python -m fastmvit evaluate imagenet/val --model s --per-class per_class.csv

Exit status: 0 when every file was classified, 1 when some were skipped (listed in the output and the
summary), 2 when the job could not run (bad options, weights, output file).
"""
from __future__ import annotations

import argparse
import re
import sys
from typing import List, Optional

from ..errors import FastMViTError, InputError, OptionError, message_for

__all__ = ["predict_main", "evaluate_main"]

# What `--ray` takes as its optional ADDRESS; any other word after it is a source.
_RAY_ADDRESS = re.compile(r"^(auto|local|ray://\S+|[\w.\-]+:\d+)$")


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return int(text)


def _common_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="s", help="variant: xxs, xs, s, v2-0.5 ... v2-2.0, a timm name, or a "
                                                "segmentation model: deeplabv3-s, ... (default s)")
    p.add_argument("--weights", help="checkpoint file or Hugging Face directory (default: pretrained)")
    p.add_argument("--random", action="store_true", help="random weights (no download); for smoke tests")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "float16", "bfloat16"),
                   help="what the model runs in (default: float16 on a GPU, float32 on the CPU)")
    p.add_argument("--input-size", type=_positive_int, help="square input size (default: the checkpoint's)")
    p.add_argument("--batch-size", type=_positive_int, default=64, help="images per forward (default 64)")
    p.add_argument("--workers", type=_count, help="decode worker processes; 0 decodes in the main process "
                                                "(default: cores - 1, at most 8)")
    p.add_argument("--progress", default="auto", choices=("auto", "bar", "lines", "off"),
                   help="a progress bar on a terminal, periodic lines otherwise (default auto)")


def _predict_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fastmvit predict",
        description="Classify image files: folders (recursive), glob patterns ('photos/**/*.jpg'), list files "
                    "(.txt/.lst, one path a line) or single images. Without --output the classes are printed; "
                    "with it one line per file is written as JSON Lines (.jsonl) or CSV (.csv), in input order, "
                    "flushed after every batch. A file that cannot be read is reported there and skipped.",
        epilog="Exit status: 0 all classified, 1 some files skipped, 2 the job could not run.")
    p.add_argument("sources", nargs="+", metavar="SOURCE", help="image file, folder, glob pattern or list file")
    _common_options(p)
    p.add_argument("--top", type=_positive_int, default=5, help="classes per image (default 5)")
    p.add_argument("--output", "-o", help="results file: .jsonl (default format) or .csv")
    p.add_argument("--format", choices=("jsonl", "csv"), help="output format (default: from the extension)")
    p.add_argument("--features", metavar="NPY", help="also write pooled features to this .npy; each output line's "
                                                      "feature_row is its row")
    p.add_argument("--out-dir", help="segmentation models (--model deeplabv3-s, ...): where to write "
                                     "<image>_mask.png and <image>_overlay.png (default: beside each image)")
    p.add_argument("--resume", action="store_true", help="continue an output file: skip the files it has")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                   help="run on a Ray cluster: ADDRESS as ray.init takes it (auto, ray://head:10001, host:port); "
                        "none starts a local one. Needs the `ray` extra")
    p.add_argument("--ray-actors", type=_positive_int, default=1,
                   help="model replicas on Ray (default 1; on GPUs one GPU each)")
    return p


def _evaluate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fastmvit evaluate",
        description="Top-1 / top-5 accuracy on a labelled set: an ImageFolder tree (root/<class>/<images>, each "
                    "<class> an ImageNet WordNet id such as n01440764 or a class index) or a list file of "
                    "'path label' lines (label an index or a WordNet id; paths relative to the list file).")
    p.add_argument("source", help="ImageFolder root or labelled list file")
    _common_options(p)
    p.add_argument("--per-class", metavar="CSV", help="write per-class accuracy (index, class_id, name, images, "
                                                      "top1, top5) to this CSV")
    return p


def _split_ray_address(argv: List[str]) -> List[str]:
    """``--ray`` takes an optional ADDRESS; argparse would take the next source for it. Keep the word after
    ``--ray`` as its address only when it looks like one."""
    out = list(argv)
    for i, a in enumerate(out):
        if a == "--ray":
            nxt = out[i + 1] if i + 1 < len(out) else None
            out[i] = f"--ray={nxt}" if nxt is not None and _RAY_ADDRESS.match(nxt) else "--ray=local"
            if nxt is not None and _RAY_ADDRESS.match(nxt):
                del out[i + 1]
            break
    return out


def _check_model_options(args) -> None:
    from ..api import parse_device
    from ..segmentation import is_segmentation_name, segmentation_variant
    from ..variants import get_variant

    (segmentation_variant if is_segmentation_name(args.model) else get_variant)(args.model)
    parse_device(args.device)


def _load_model(args):
    from .. import load
    from ..api import parse_device
    from ..serving.common import resolve_dtype

    device = parse_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    return load(args.model, args.weights, pretrained=not args.random,
                num_classes=None if args.weights else 1000, device=device, dtype=dtype, backend="auto")


def _predictor(model, args, **kw):
    from ..serving.common import InputLimits
    from .predict import BatchPredictor

    return BatchPredictor(model, batch_size=args.batch_size, num_workers=args.workers, input_size=args.input_size,
                          limits=InputLimits(), **kw)


def _run_predict(args) -> int:
    from .output import TextWriter, open_writer
    from .progress import Progress
    from .sources import find_images

    if args.resume and not args.output:
        raise OptionError("--resume continues an output file: give it with --output")
    if args.features and not args.output:
        raise OptionError("--features needs --output (each output line's feature_row points into the .npy)")
    _check_model_options(args)  # before walking what may be a million files
    paths = find_images(args.sources)
    model = _load_model(args)
    if getattr(model, "task", None) == "segmentation":  # masks, not classes
        from ..masks import print_written_masks

        return print_written_masks(model, paths, args.out_dir)
    predictor = _predictor(model, args, top_k=args.top, features=bool(args.features))
    writer = (open_writer(args.output, predictor.top_k, fmt=args.format, resume=args.resume, overwrite=args.overwrite)
              if args.output else TextWriter(predictor.top_k, sys.stdout))
    try:
        if args.features:
            writer.attach_features(args.features, model.variant.num_features, args.resume)
        todo = [p for p in paths if p not in writer.done]
        if args.resume:
            print(f"resuming {args.output}: {len(paths) - len(todo)} of {len(paths)} files already done",
                  file=sys.stderr)
        if args.ray is not None:
            from .ray_data import ray_predictions

            batches = ray_predictions(predictor, todo, address=None if args.ray == "local" else args.ray,
                                      model=args.model, weights=args.weights, pretrained=not args.random,
                                      actors=args.ray_actors, device=args.device, dtype=args.dtype)
        else:
            batches = predictor(todo)
        progress = Progress(len(todo), mode=args.progress)
        try:
            for batch in batches:
                writer.write(batch)
                progress.update(len(batch.paths), len(batch.errors))
        except KeyboardInterrupt:
            progress.close()
            print(f"interrupted: every finished batch is in the output; rerun with --resume to continue",
                  file=sys.stderr)
            return 130
        progress.close()
    finally:
        writer.close()
    stats = predictor.stats
    print(stats.summary(), file=sys.stderr)
    return 1 if stats.skipped else 0


def _run_evaluate(args) -> int:
    from .evaluate import evaluate, read_labelled
    from .progress import Progress

    model = _load_model(args)
    labels = model.pretrained_cfg.get("labels")
    data = read_labelled(args.source, model.num_classes, None if labels in (None, "imagenet-1k") else labels)
    predictor = _predictor(model, args, top_k=min(5, model.num_classes))
    progress = Progress(len(data.paths), mode=args.progress)
    result = evaluate(predictor, data, on_batch=lambda b: progress.update(len(b.paths), len(b.errors)))
    progress.close()
    if args.per_class:
        result.write_per_class(args.per_class, data)
    print(result.stats.summary(), file=sys.stderr)
    print(result.summary())
    return 1 if result.stats.skipped else 0


def _main(parser: argparse.ArgumentParser, run, argv: List[str]) -> int:
    args = parser.parse_args(argv)
    try:
        return run(args)
    except FastMViTError as e:  # as python -m fastmvit reports every command's errors
        print(f"error: {message_for(e, 'cli')}", file=sys.stderr)
        return 2


def predict_main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    return _main(_predict_parser(), _run_predict, _split_ray_address(argv))


def evaluate_main(argv: Optional[List[str]] = None) -> int:
    return _main(_evaluate_parser(), _run_evaluate, list(sys.argv[1:] if argv is None else argv))
