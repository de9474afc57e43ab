"""Accuracy of a model on a labelled image set: an ImageFolder tree (one folder per class, named by WordNet
id or class index) or a list file of ``path label`` lines; top-1 and top-5, images/s and a per-class table."""
from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass, field
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import torch

from ..errors import InputError
from ..preprocess import imagenet_classes, imagenet_wnids
from .predict import BatchPredictor, PredictionBatch, RunStats
from .sources import _walk

__all__ = ["LabelledImages", "read_labelled", "Evaluation", "evaluate"]

_WNID = re.compile(r"^n\d{8}$")


@dataclass
class LabelledImages:
    paths: List[str]
    labels: List[int]
    class_names: List[str]   # per class index: a display name
    class_ids: List[str]     # per class index: the WordNet id (ImageNet) or the index as text


def _class_naming(num_classes: int, labels: Optional[Sequence[str]]):
    imagenet = num_classes == 1000 and (labels is None or list(labels) == imagenet_classes())
    names = list(labels) if labels is not None else (imagenet_classes() if imagenet else
                                                     [str(i) for i in range(num_classes)])
    ids = imagenet_wnids() if imagenet else [str(i) for i in range(num_classes)]
    return imagenet, names, ids


def _label_parser(num_classes: int, labels: Optional[Sequence[str]]) -> Callable[[str, str], int]:
    imagenet, names, _ = _class_naming(num_classes, labels)
    wnid_index = {w: i for i, w in enumerate(imagenet_wnids())} if imagenet else {}
    name_index = {n: i for i, n in enumerate(names)}

    def parse(token: str, where: str) -> int:
        if token.isdigit():
            index = int(token)
            if index < num_classes:
                return index
            raise InputError(f"{where}: class index {index} is out of range for a model of {num_classes} classes")
        if _WNID.match(token):
            if not imagenet:
                raise InputError(f"{where}: {token!r} is a WordNet id, but the model's {num_classes} classes are not "
                                 f"ImageNet-1k's; name classes by index 0..{num_classes - 1}")
            if token in wnid_index:
                return wnid_index[token]
            raise InputError(f"{where}: {token!r} is not one of the 1000 ImageNet-1k WordNet ids")
        if token in name_index:
            return name_index[token]
        raise InputError(f"{where}: cannot read the class {token!r}: give a class index (0..{num_classes - 1})"
                         + (", an ImageNet WordNet id (n01440764)" if imagenet else "")
                         + (" or one of the model's label names" if labels is not None else ""))
    return parse


def read_labelled(source: str, num_classes: int = 1000, labels: Optional[Sequence[str]] = None) -> LabelledImages:
    """Paths and class indices from an ImageFolder tree (``root/<class>/**/*.jpg``, ``<class>`` a WordNet
    id such as ``n01440764`` or an index) or a list file (``path label`` per line, the label last, the path
    relative to the list file's folder; ``#`` comments and blank lines ignored)."""
    _, names, ids = _class_naming(num_classes, labels)
    parse = _label_parser(num_classes, labels)
    paths: List[str] = []
    targets: List[int] = []
    if os.path.isdir(source):
        classes = sorted(d for d in os.listdir(source) if os.path.isdir(os.path.join(source, d))
                         and not d.startswith("."))
        if not classes:
            raise InputError(f"{source} has no class folders: an ImageFolder tree is root/<class>/<image>, "
                             f"<class> a WordNet id (n01440764) or a class index")
        for c in classes:
            index = parse(c, f"folder {os.path.join(source, c)}")
            found = _walk(os.path.join(source, c))
            paths += found
            targets += [index] * len(found)
    elif os.path.isfile(source):
        base = os.path.dirname(os.path.abspath(source))
        with open(source, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                parts = line.rsplit(None, 1)
                if len(parts) != 2:
                    raise InputError(f"{source}, line {n}: expected 'path label', got {line[:80]!r}")
                path, token = parts
                paths.append(path if os.path.isabs(path) else os.path.join(base, path))
                targets.append(parse(token, f"{source}, line {n}"))
    else:
        raise InputError(f"{source!r} is neither an ImageFolder tree nor a list file of 'path label' lines")
    if not paths:
        raise InputError(f"no images found in {source}")
    return LabelledImages(paths, targets, names, ids)


@dataclass
class Evaluation:
    images: int = 0
    top1: int = 0
    top5: int = 0
    per_class: dict = field(default_factory=dict)  # index -> [images, top1, top5]
    stats: RunStats = field(default_factory=RunStats)

    @property
    def top1_accuracy(self) -> float:
        return self.top1 / self.images if self.images else 0.0

    @property
    def top5_accuracy(self) -> float:
        return self.top5 / self.images if self.images else 0.0

    def add(self, logits: torch.Tensor, targets: List[int]) -> None:
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        for row, t in zip(top.tolist(), targets):
            hit1, hit5 = row[0] == t, t in row
            self.images += 1
            self.top1 += hit1
            self.top5 += hit5
            c = self.per_class.setdefault(t, [0, 0, 0])
            c[0] += 1
            c[1] += hit1
            c[2] += hit5

    def write_per_class(self, path: str, data: LabelledImages) -> None:
        with open(path, "w", encoding="utf-8", newline="") as f:
            w = csv.writer(f)
            w.writerow(["index", "class_id", "name", "images", "top1", "top5"])
            for index in sorted(self.per_class):
                n, h1, h5 = self.per_class[index]
                w.writerow([index, data.class_ids[index], data.class_names[index], n, f"{h1 / n:.4f}", f"{h5 / n:.4f}"])

    def summary(self) -> str:
        return (f"top-1 {self.top1_accuracy:.2%}  top-5 {self.top5_accuracy:.2%}  on {self.images} images "
                f"({self.stats.skipped} skipped), {self.stats.images_per_s:.1f} images/s")


def evaluate(predictor: BatchPredictor, data: LabelledImages,
             on_batch: Optional[Callable[[PredictionBatch], None]] = None) -> Evaluation:
    """Run ``predictor`` over ``data`` and count top-1 / top-5 hits, overall and per class. Files that
    cannot be read are skipped (and reported in ``result.stats.errors``), not counted as misses."""
    result = Evaluation()
    for batch in predictor(data.paths):
        result.add(batch.logits, [data.labels[i] for i in batch.positions])
        if on_batch is not None:
            on_batch(batch)
    result.stats = predictor.stats
    return result
