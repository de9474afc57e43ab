"""Evaluation: labels equal to the model's own predictions score 100% top-1; shuffled labels fall to
exactly the hits a permutation leaves."""
import csv
import os

import numpy as np
import pytest

import fastmvit
from fastmvit.offline import BatchPredictor, evaluate, read_labelled
from fastmvit.offline.cli import evaluate_main

from ..serving.helpers import INPUT_SIZE, MODEL, encode


@pytest.fixture(scope="module")
def labelled(checkpoint, tmp_path_factory):
    """24 noise images of different sizes and tints, and the class the model gives each."""
    root = tmp_path_factory.mktemp("labelled")
    rng = np.random.default_rng(11)
    flat = root / "flat"
    flat.mkdir()
    paths = []
    for i in range(24):
        arr = (rng.random((60 + 5 * i, 70, 3)) * rng.uniform(0.2, 1.0, 3) * 255).astype(np.uint8)
        p = flat / f"{i:02d}.png"
        p.write_bytes(encode(arr, "PNG"))
        paths.append(str(p))
    model = fastmvit.load(MODEL, checkpoint)
    predictor = BatchPredictor(model, batch_size=8, num_workers=0, top_k=1, input_size=INPUT_SIZE)
    preds = {}
    for b in predictor(paths):
        preds.update({p: int(i) for p, i in zip(b.paths, b.logits.argmax(1))})
    assert len(set(preds.values())) >= 4, "the test needs images the model tells apart"
    return root, paths, preds


def test_imagefolder_of_own_predictions_is_100_percent(checkpoint, labelled, tmp_path, capsys):
    root, paths, preds = labelled
    tree = tmp_path / "tree"
    from fastmvit.preprocess import imagenet_wnids

    for j, p in enumerate(paths):
        # WordNet ids for most folders, a class index for the others (both are accepted)
        name = str(preds[p]) if j % 3 == 0 else imagenet_wnids()[preds[p]]
        d = tree / name
        d.mkdir(parents=True, exist_ok=True)
        os.link(p, d / os.path.basename(p))
    (tree / imagenet_wnids()[0]).mkdir(exist_ok=True)
    (tree / imagenet_wnids()[0] / "broken.jpg").write_bytes(b"not a jpeg")
    per_class = tmp_path / "per_class.csv"
    rc = evaluate_main([str(tree), "--model", MODEL, "--weights", checkpoint, "--input-size", str(INPUT_SIZE),
                        "--batch-size", "5", "--workers", "1", "--per-class", str(per_class), "--progress", "off"])
    out = capsys.readouterr()
    assert rc == 1, out.err  # a file was skipped
    assert "top-1 100.00%  top-5 100.00%  on 24 images (1 skipped)" in out.out
    with open(per_class, newline="") as f:
        rows = list(csv.DictReader(f))
    counts = {}
    for p in paths:
        counts[preds[p]] = counts.get(preds[p], 0) + 1
    assert {int(r["index"]): int(r["images"]) for r in rows} == counts
    assert all(r["top1"] == "1.0000" for r in rows)
    assert all(r["class_id"] == imagenet_wnids()[int(r["index"])] for r in rows)


def test_shuffled_labels_fall_to_chance(checkpoint, labelled, tmp_path):
    root, paths, preds = labelled
    rng = np.random.default_rng(5)
    labels = [preds[p] for p in paths]
    shuffled = list(rng.permutation(labels))
    listing = tmp_path / "val.txt"
    listing.write_text("".join(f"{os.path.relpath(p, tmp_path)} {y}\n" for p, y in zip(paths, shuffled)))
    model = fastmvit.load(MODEL, checkpoint)
    data = read_labelled(str(listing), 1000)
    assert data.labels == [int(y) for y in shuffled]
    result = evaluate(BatchPredictor(model, batch_size=7, num_workers=0, input_size=INPUT_SIZE), data)
    expected_hits = sum(a == b for a, b in zip(labels, shuffled))  # counted without fastmvit's evaluate
    assert result.top1 == expected_hits
    assert result.top1_accuracy < 0.5  # far from the 100% of the unshuffled labels


def test_label_errors_say_what_is_accepted(tmp_path):
    bad = tmp_path / "val.txt"
    bad.write_text("a.jpg n99999999\n")
    with pytest.raises(fastmvit.InputError, match="not one of the 1000 ImageNet-1k WordNet ids"):
        read_labelled(str(bad))
    bad.write_text("a.jpg 1000\n")
    with pytest.raises(fastmvit.InputError, match="out of range"):
        read_labelled(str(bad))
    bad.write_text("a.jpg cat\n")
    with pytest.raises(fastmvit.InputError, match="class index"):
        read_labelled(str(bad))
    (tmp_path / "tree" / "n01440764").mkdir(parents=True)
    with pytest.raises(fastmvit.InputError, match="WordNet id"):
        read_labelled(str(tmp_path / "tree"), num_classes=10)


def test_imagenet_wnids_in_training_order():
    from fastmvit.preprocess import imagenet_classes, imagenet_wnids

    wnids = imagenet_wnids()
    assert len(set(wnids)) == 1000 and all(len(w) == 9 and w[0] == "n" and w[1:].isdigit() for w in wnids)
    # torchvision/timm sort the ImageNet folders by WordNet id: the training index order is the sorted order
    assert wnids == sorted(wnids)
    assert (wnids[0], imagenet_classes()[0]) == ("n01440764", "tench, Tinca tinca")
