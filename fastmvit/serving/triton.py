"""Triton Inference Server plug-in: write a model repository that serves fastmvit through the Python backend.

    python -m fastmvit.serving.triton REPO --model s [--weights PATH] [--device gpu] [--max-batch-size 32]
    tritonserver --model-repository REPO

``REPO/<name>/config.pbtxt`` sets dynamic batching (preferred batch sizes = the sizes the model warms up
and captures CUDA graphs for), ``max_batch_size``, fixed input dims and the instance group;
``REPO/<name>/1/model.py`` loads ``fastmvit.serving.triton_model.TritonPythonModel`` from the installed
fastmvit, which must be importable by the backend's Python (the ``python3`` first on the server's PATH).

The model's interface (Open Inference Protocol / KServe V2), per request, a batch of N images:
    inputs, one of:  image        FP32  [N, 3, S, S]  pixels in [0, 1], preprocessed as the weights expect
                     image_bytes  BYTES [N, 1]        encoded images (JPEG, PNG, WebP, ...)
    outputs:         logits       FP32  [N, C]        (also Triton's classification extension: class_count)
                     topk_indices INT64 [N, K]
                     topk_scores  FP32  [N, K]        softmax probabilities
                     topk_labels  BYTES [N, K]        class names (UTF-8)
A bad request gets its own 400 error; the other requests of its batch are answered as usual.

A segmentation model (``--model deeplabv3-<variant>``) sees whole images and answers a mask per image:
    inputs, one of:  image        FP32  [N, 3, H, W]  pixels in [0, 1] (any H, W; the mask is H x W)
                     image_bytes  BYTES [N, 1]        encoded images: resized so the shorter side is S,
                                                      the mask at the image's own size
    outputs:         mask_png     BYTES [N, 1]        PNG whose pixel values are class indices (8-bit palette,
                                                      PASCAL VOC colours; 16-bit grey above 256 classes)
``labels.txt`` names the classes, line i for index i. The model groups the images of all the requests
of a batch by input shape and runs one forward per shape.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import List, Optional, Sequence, Union

from .common import InputLimits, default_batch_sizes, scaled_preprocess

__all__ = ["write_model_repository", "config_pbtxt", "main"]

MODEL_PY = '''"""Triton Python-backend entry point for fastmvit, written by `python -m fastmvit.serving.triton`.

The implementation lives in the installed fastmvit package (fastmvit/serving/triton_model.py), so the
Python that runs this backend must import fastmvit; the settings are the parameters in ../config.pbtxt.
"""
from fastmvit.serving.triton_model import TritonPythonModel  # noqa: F401
'''


def _param(key: str, value) -> str:
    return f'  {{ key: "{key}" value: {{ string_value: "{value}" }} }}'


def config_pbtxt(*, name: str, image_size: int, num_classes: int, top_k: int, kind: str, instances: int = 1,
                 gpus: Optional[Sequence[int]] = None, max_batch_size: int = 32,
                 batch_sizes: Optional[Sequence[int]] = None, max_queue_delay_us: int = 2000,
                 parameters: Optional[dict] = None, label_file: Optional[str] = "labels.txt",
                 queue_timeout_s: Optional[float] = 30.0, max_queue_size: Optional[int] = 256,
                 task: str = "classification") -> str:
    """The text of ``config.pbtxt``. ``kind`` is "cpu" or "gpu"; ``batch_sizes`` (default 1, 2, 4, ... up
    to ``max_batch_size``) are the sizes the model warms up: those above 1 become the preferred batch
    sizes (1 would let the batcher send every lone request at once instead of waiting to batch).
    ``queue_timeout_s``: a request waiting longer for an instance is rejected (UNAVAILABLE) instead of
    waiting forever behind a hung one; a client may ask for less with its own ``timeout`` parameter.
    ``max_queue_size``: more queued requests are rejected at once (UNAVAILABLE). None: no limit.
    ``task`` "segmentation": images of any size in, ``mask_png`` out (``top_k`` is unused)."""
    if task not in ("classification", "segmentation"):
        raise ValueError(f"task must be 'classification' or 'segmentation', got {task!r}")
    if kind not in ("cpu", "gpu"):
        raise ValueError(f"kind must be 'cpu' or 'gpu', got {kind!r}")
    sizes = sorted(set(batch_sizes or default_batch_sizes(max_batch_size)))
    if sizes[-1] > max_batch_size or sizes[0] < 1:
        raise ValueError(f"batch sizes {sizes} must lie in 1..max_batch_size={max_batch_size}")
    preferred = [b for b in sizes if b > 1] or [max_batch_size]
    group = f"kind: KIND_{kind.upper()} count: {int(instances)}"
    if kind == "gpu" and gpus:
        group += f" gpus: [ {', '.join(str(int(g)) for g in gpus)} ]"
    params = dict(parameters or {})
    if kind == "gpu":
        # let inputs stay where the client put them (CUDA shared memory) instead of a copy to the host
        params.setdefault("FORCE_CPU_ONLY_INPUT_TENSORS", "no")
    labels = f' label_filename: "{label_file}"' if label_file else ""
    # segmentation: whole images of any size (the model checks the limits), one mask PNG each
    dims = "3, -1, -1" if task == "segmentation" else f"3, {image_size}, {image_size}"
    lines = [
        f'name: "{name}"',
        'backend: "python"',
        f"max_batch_size: {int(max_batch_size)}",
        "input [",
        f'  {{ name: "image" data_type: TYPE_FP32 dims: [ {dims} ] optional: true }},',
        '  { name: "image_bytes" data_type: TYPE_STRING dims: [ 1 ] optional: true }',
        "]",
        "output [",
    ]
    if task == "segmentation":
        lines += [f'  {{ name: "mask_png" data_type: TYPE_STRING dims: [ 1 ]{labels} }}']
    else:
        lines += [
            f'  {{ name: "logits" data_type: TYPE_FP32 dims: [ {num_classes} ]{labels} }},',
            f'  {{ name: "topk_indices" data_type: TYPE_INT64 dims: [ {top_k} ] }},',
            f'  {{ name: "topk_scores" data_type: TYPE_FP32 dims: [ {top_k} ] }},',
            f'  {{ name: "topk_labels" data_type: TYPE_STRING dims: [ {top_k} ] }}',
        ]
    lines += [
        "]",
        "dynamic_batching {",
        f"  preferred_batch_size: [ {', '.join(map(str, preferred))} ]",
        f"  max_queue_delay_microseconds: {int(max_queue_delay_us)}",
    ]
    policy = []
    if queue_timeout_s is not None:
        policy += ["timeout_action: REJECT", f"default_timeout_microseconds: {int(queue_timeout_s * 1e6)}",
                   "allow_timeout_override: true"]
    if max_queue_size is not None:
        policy += [f"max_queue_size: {int(max_queue_size)}"]
    if policy:
        lines += [f"  default_queue_policy {{ {' '.join(policy)} }}"]
    lines += [
        "}",
        f"instance_group [ {{ {group} }} ]",
    ]
    if params:
        lines += ["parameters ["] + [",\n".join(_param(k, v) for k, v in params.items())] + ["]"]
    return "\n".join(lines) + "\n"


def _copy_weights(weights: Path, version_dir: Path) -> str:
    """Copy a checkpoint (file, with a Hugging Face config.json / preprocessor_config.json beside it, or a
    directory) into ``version_dir/weights``; return its path relative to ``version_dir``."""
    dest = version_dir / "weights"
    if dest.exists():
        shutil.rmtree(dest)
    if weights.is_dir():
        shutil.copytree(weights, dest)
        return "weights"
    dest.mkdir(parents=True)
    shutil.copy2(weights, dest / weights.name)
    for sibling in ("config.json", "preprocessor_config.json"):
        if (weights.parent / sibling).is_file():
            shutil.copy2(weights.parent / sibling, dest / sibling)
    return f"weights/{weights.name}"


def write_model_repository(
    repository: Union[str, Path],
    model: str = "s",
    weights: Union[str, Path, None] = None,
    *,
    pretrained: Union[bool, str] = True,
    name: str = "fastmvit",
    kind: str = "auto",
    instances: int = 1,
    gpus: Optional[Sequence[int]] = None,
    max_batch_size: int = 32,
    batch_sizes: Optional[Sequence[int]] = None,
    max_queue_delay_us: int = 2000,
    queue_timeout_s: Optional[float] = 30.0,
    max_queue_size: Optional[int] = 256,
    top_k: int = 5,
    dtype: str = "auto",
    input_size: Optional[int] = None,
    limits: InputLimits = InputLimits(),
    copy_weights: bool = False,
    cpu_threads: Optional[int] = None,
    version: int = 1,
) -> Path:
    """Write ``repository/name/{config.pbtxt, labels.txt, <version>/model.py}`` and return the model folder.
    A segmentation model (a ``deeplabv3-<variant>`` name or a DeepLabV3 checkpoint) gets the ``mask_png``
    output (module docstring) and its class names in ``labels.txt``.

    The model is loaded once here (on the CPU) to learn its input size, classes and labels, so the
    repository's fixed dims match what the server will load. ``weights`` is referenced by absolute path,
    or copied into the version folder with ``copy_weights``. ``kind``: "cpu", "gpu" or "auto" (gpu when
    this machine has CUDA). ``dtype`` is what runs inside: "auto" is float16 on a GPU, float32 on the
    CPU; the wire is float32 either way.
    """
    import torch

    from .. import load

    if kind == "auto":
        kind = "gpu" if torch.cuda.is_available() else "cpu"
    if kind not in ("cpu", "gpu"):
        raise ValueError(f"kind must be 'auto', 'cpu' or 'gpu', got {kind!r}")
    if dtype == "auto":
        dtype = "float16" if kind == "gpu" else "float32"
    if dtype not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"dtype must be auto, float32, float16 or bfloat16, got {dtype!r}")
    net = load(model, weights, pretrained=pretrained, num_classes=None if weights is not None else 1000)
    cfg = scaled_preprocess(net.pretrained_cfg["preprocess"], input_size)
    labels = net.pretrained_cfg.get("labels")
    if labels == "imagenet-1k":
        from ..preprocess import imagenet_classes

        labels = imagenet_classes()
    task = getattr(net, "task", "classification")
    served = f"deeplabv3-{net.variant.name}" if task == "segmentation" else net.variant.name
    if task == "classification" and not 1 <= top_k <= net.num_classes:
        raise ValueError(f"top_k must lie in 1..{net.num_classes}, got {top_k}")

    model_dir = Path(repository) / name
    version_dir = model_dir / str(version)
    version_dir.mkdir(parents=True, exist_ok=True)
    if weights is None:
        weights_ref = ""
    elif copy_weights:
        weights_ref = _copy_weights(Path(weights).expanduser().resolve(), version_dir)
    else:
        weights_ref = str(Path(weights).expanduser().resolve())
    params = {
        "fastmvit_model": served,
        "fastmvit_task": task,
        "fastmvit_weights": weights_ref,
        "fastmvit_pretrained": str(pretrained).lower() if not isinstance(pretrained, str) else pretrained,
        "fastmvit_dtype": dtype,
        "fastmvit_input_size": cfg.input_size,
        "fastmvit_top_k": top_k,
        "fastmvit_max_image_bytes": limits.max_bytes,
        "fastmvit_max_pixels": limits.max_pixels,
        "fastmvit_min_side": limits.min_side,
    }
    if cpu_threads:
        params["fastmvit_cpu_threads"] = int(cpu_threads)
    text = config_pbtxt(name=name, image_size=cfg.input_size, num_classes=net.num_classes, top_k=top_k,
                        kind=kind, instances=instances, gpus=gpus, max_batch_size=max_batch_size,
                        batch_sizes=batch_sizes, max_queue_delay_us=max_queue_delay_us, parameters=params,
                        queue_timeout_s=queue_timeout_s, max_queue_size=max_queue_size, task=task)
    (model_dir / "config.pbtxt").write_text(text)
    names = labels if labels is not None else [str(i) for i in range(net.num_classes)]
    (model_dir / "labels.txt").write_text("".join(n.replace("\n", " ") + "\n" for n in names), encoding="utf-8")
    (version_dir / "model.py").write_text(MODEL_PY)
    return model_dir


# -------------------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastmvit.serving.triton",
                                description="Write a Triton Inference Server model repository for a fastmvit "
                                            "model (Python backend, dynamic batching).")
    p.add_argument("repository", help="model repository folder to write into (created if missing)")
    p.add_argument("--model", default="s", help="variant: xxs, xs, s, v2-0.5 ... v2-2.0, or a segmentation model "
                                                "deeplabv3-<variant> (default s)")
    p.add_argument("--weights", help="checkpoint file or Hugging Face directory (default: pretrained)")
    p.add_argument("--random", action="store_true", help="random weights (no download); for smoke tests")
    p.add_argument("--name", default="fastmvit", help="model name in the repository (default fastmvit)")
    p.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto",
                   help="instance kind: KIND_GPU or KIND_CPU (default: gpu if this machine has CUDA)")
    p.add_argument("--instances", type=int, default=1, help="model instances (per GPU for gpu; default 1)")
    p.add_argument("--gpus", type=int, nargs="*", help="GPU ids for the instances (default: all)")
    p.add_argument("--max-batch-size", type=int, default=32, help="largest batch (default 32)")
    p.add_argument("--batch-sizes", type=int, nargs="+",
                   help="sizes to warm up and prefer (default 1, 2, 4, ... max-batch-size)")
    p.add_argument("--max-queue-delay-us", type=int, default=2000,
                   help="how long a request may wait for a batch to fill, in microseconds (default 2000)")
    p.add_argument("--queue-timeout", type=float, default=30.0,
                   help="seconds a request may wait for an instance before it is rejected (default 30; 0: none)")
    p.add_argument("--max-queue-size", type=int, default=256,
                   help="queued requests beyond this are rejected at once (default 256; 0: no limit)")
    p.add_argument("--top-k", type=int, default=5, help="classes in the top-k outputs (default 5)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "float16", "bfloat16"),
                   help="what runs inside (default: float16 on gpu, float32 on cpu); the wire is float32")
    p.add_argument("--input-size", type=int, help="square input size (default: the checkpoint's)")
    p.add_argument("--copy-weights", action="store_true", help="copy the weights into the repository")
    p.add_argument("--cpu-threads", type=int, help="torch threads per CPU instance (default: torch's)")
    p.add_argument("--max-image-bytes", type=int, default=InputLimits.max_bytes)
    p.add_argument("--max-pixels", type=int, default=InputLimits.max_pixels)
    p.add_argument("--min-side", type=int, default=InputLimits.min_side)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    from ..errors import FastMViTError, message_for

    args = _parser().parse_args(argv)
    try:
        limits = InputLimits(args.max_image_bytes, args.max_pixels, args.min_side)
        model_dir = write_model_repository(
            args.repository, args.model, args.weights, pretrained=not args.random, name=args.name,
            kind=args.device, instances=args.instances, gpus=args.gpus, max_batch_size=args.max_batch_size,
            batch_sizes=args.batch_sizes, max_queue_delay_us=args.max_queue_delay_us, top_k=args.top_k,
            queue_timeout_s=args.queue_timeout or None, max_queue_size=args.max_queue_size or None,
            dtype=args.dtype, input_size=args.input_size, limits=limits, copy_weights=args.copy_weights,
            cpu_threads=args.cpu_threads)
    except (FastMViTError, ValueError) as e:
        print(f"error: {message_for(e)}", file=sys.stderr)
        return 2
    print(f"wrote {model_dir}; serve it with: tritonserver --model-repository {model_dir.parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
