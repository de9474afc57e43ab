"""Batch prediction over folders: every readable image once, as if classified alone; bad files reported
and skipped; resume; CSV; features; the command line."""
import csv
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import fastmvit
from fastmvit.offline import BatchPredictor, find_images
from fastmvit.offline.cli import predict_main
from fastmvit.offline.progress import Progress
from fastmvit.serving.common import scaled_preprocess

from ..serving.helpers import INPUT_SIZE, MODEL, assert_same_top_k
from .conftest import BAD, image_files


@pytest.fixture(scope="module")
def reference(checkpoint, folder):
    """What each good image gets classified alone: the plain model on that image, preprocessed alone
    (logits, pooled features)."""
    model = fastmvit.load(MODEL, checkpoint)
    cfg = scaled_preprocess(model.pretrained_cfg["preprocess"], INPUT_SIZE)
    out = {}
    with torch.inference_mode():
        for p in image_files(folder):
            if os.path.relpath(p, folder) not in BAD:
                x = fastmvit.preprocess([p], cfg)
                out[p] = model(x)[0], model.forward_features(x).mean(dim=(-2, -1))[0]
    return out


def _predict(*args):
    return predict_main([*map(str, args), "--model", MODEL, "--input-size", str(INPUT_SIZE), "--progress", "off"])


def _jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _check_records(records, folder, reference, k):
    """One record per file, every good one equal to the image classified alone, every bad one explained."""
    paths = [r["path"] for r in records]
    assert sorted(paths) == image_files(folder)
    assert len(set(paths)) == len(paths)
    for r in records:
        rel = os.path.relpath(r["path"], folder)
        if rel in BAD:
            assert set(r) == {"path", "error"} and BAD[rel] in r["error"], r
            continue
        logits, _ = reference[r["path"]]
        assert len(r["labels"]) == len(r["indices"]) == len(r["scores"]) == k
        assert_same_top_k([{"label": lb, "score": s} for lb, s in zip(r["labels"], r["scores"])], logits, k)
        assert [fastmvit.imagenet_classes()[i] for i in r["indices"]] == r["labels"]


def test_folder_to_jsonl_with_workers(checkpoint, folder, reference, tmp_path, capsys):
    out = tmp_path / "preds.jsonl"
    rc = _predict(folder, "--weights", checkpoint, "--output", out, "--batch-size", 4, "--workers", 2, "--top", 3)
    err = capsys.readouterr().err
    assert rc == 1, err  # some files were skipped
    records = _jsonl(out)
    _check_records(records, folder, reference, 3)
    assert [r["path"] for r in records] == find_images([str(folder)])  # input order
    assert f"{len(reference)} images classified, {len(BAD)} skipped" in err
    for rel in BAD:
        assert str(folder / rel) in err
    assert "bound by:" in err and "waiting for decoded images" in err


def test_api_batches_are_fixed_size_in_input_order(checkpoint, folder, reference):
    model = fastmvit.load(MODEL, checkpoint)
    predictor = BatchPredictor(model, batch_size=4, num_workers=0, top_k=2, input_size=INPUT_SIZE)
    paths = find_images(str(folder))
    batches = list(predictor(paths))
    slots = [len(b.paths) + len(b.errors) for b in batches]
    assert slots == [4] * (len(paths) // 4) + ([len(paths) % 4] if len(paths) % 4 else [])
    positions = sorted(p for b in batches for p in b.positions + b.error_positions)
    assert positions == list(range(len(paths)))
    for b in batches:
        got_paths, predictions = b  # unpacks as (paths, predictions)
        assert got_paths == b.paths and len(predictions) == len(got_paths) == b.logits.shape[0]
        for p, logits in zip(b.paths, b.logits):
            torch.testing.assert_close(logits, reference[p][0], rtol=1e-4, atol=1e-4)
    s = predictor.stats
    assert (s.total, s.done, s.skipped) == (len(paths), len(reference), len(BAD))
    assert {p for p, _ in s.errors} == {str(folder / rel) for rel in BAD}


def test_resume_continues_without_duplicates(checkpoint, folder, reference, tmp_path, capsys):
    full = tmp_path / "full.jsonl"
    assert _predict(folder, "--weights", checkpoint, "-o", full, "--batch-size", 4, "--workers", 0) == 1
    lines = full.read_text().splitlines(keepends=True)
    cut = tmp_path / "cut.jsonl"
    # a run killed after 6 lines, in the middle of the 7th
    cut.write_text("".join(lines[:6]) + lines[6][: len(lines[6]) // 2])
    capsys.readouterr()
    assert _predict(folder, "--weights", checkpoint, "-o", cut, "--batch-size", 4, "--workers", 0, "--resume") == 1
    err = capsys.readouterr().err
    assert f"6 of {len(lines)} files already done" in err
    assert f"of {len(lines) - 6}, in" in err  # only the rest was decoded
    records = _jsonl(cut)
    _check_records(records, folder, reference, 5)
    assert [r["path"] for r in records] == [json.loads(x)["path"] for x in lines]
    # resuming a finished file does nothing
    assert _predict(folder, "--weights", checkpoint, "-o", cut, "--resume") == 0
    assert _jsonl(cut) == records


def test_existing_output_is_not_overwritten(checkpoint, folder, tmp_path, capsys):
    out = tmp_path / "x.jsonl"
    out.write_text('{"path": "keep me"}\n')
    assert _predict(folder, "--weights", checkpoint, "-o", out) == 2
    assert "already exists" in capsys.readouterr().err and out.read_text() == '{"path": "keep me"}\n'


def test_csv_and_features(checkpoint, folder, reference, tmp_path):
    out, feats = tmp_path / "preds.csv", tmp_path / "feats.npy"
    assert _predict(folder, "--weights", checkpoint, "-o", out, "--features", feats, "--top", 2,
                    "--batch-size", 3, "--workers", 1) == 1
    with open(out, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["path", "label_1", "index_1", "score_1", "label_2", "index_2", "score_2", "error",
                             "feature_row"]
    records = [{"path": r["path"], "error": r["error"]} if r["error"] else
               {"path": r["path"], "labels": [r["label_1"], r["label_2"]],
                "indices": [int(r["index_1"]), int(r["index_2"])], "scores": [float(r["score_1"]), float(r["score_2"])]}
               for r in rows]
    _check_records(records, folder, reference, 2)
    features = np.load(feats)
    assert features.shape == (len(reference), fastmvit.get_variant(MODEL).num_features)
    assert sorted(int(r["feature_row"]) for r in rows if not r["error"]) == list(range(len(reference)))
    for r in rows:
        if not r["error"]:
            ref = reference[r["path"]][1].numpy()
            np.testing.assert_allclose(features[int(r["feature_row"])], ref, rtol=1e-4, atol=1e-4)


def test_features_resume_drops_rows_past_the_last_line(checkpoint, folder, reference, tmp_path):
    out, feats = tmp_path / "p.jsonl", tmp_path / "f.npy"
    args = (folder, "--weights", checkpoint, "-o", out, "--features", feats, "--batch-size", 4, "--workers", 0)
    assert _predict(*args) == 1
    full, full_feats = _jsonl(out), np.load(feats)
    keep = [r for r in full[:7]]
    rows = max(r.get("feature_row", -1) for r in keep) + 1
    out.write_text("".join(json.dumps(r) + "\n" for r in keep))
    with open(feats, "r+b") as f:  # rows whose lines never made it to the output (more than the rest of the job)
        f.truncate(128 + 4 * full_feats.shape[1] * (len(full_feats) + 3))
    assert _predict(*args, "--resume") == 1
    again, again_feats = _jsonl(out), np.load(feats)
    assert [r["path"] for r in again] == [r["path"] for r in full]
    assert again_feats.shape == full_feats.shape
    assert os.path.getsize(feats) == 128 + again_feats.nbytes  # a valid .npy, nothing stale past its rows
    for r in again:
        if "error" not in r:
            np.testing.assert_allclose(again_feats[r["feature_row"]], reference[r["path"]][1].numpy(),
                                       rtol=1e-4, atol=1e-4)


def test_csv_resume_refuses_another_top_k(checkpoint, folder, tmp_path, capsys):
    out = tmp_path / "p.csv"
    out.write_text("path,label_1,index_1,score_1,error,feature_row\n")
    assert _predict(folder, "--weights", checkpoint, "-o", out, "--resume", "--top", 2) == 2
    assert "top-2" in capsys.readouterr().err


def test_sources_folders_globs_lists(folder, tmp_path):
    walk = find_images(str(folder))
    assert sorted(walk) == image_files(folder)
    assert not any(p.endswith((".md", ".hidden.jpg")) for p in walk)
    listing = tmp_path / "list.txt"
    rel = os.path.relpath(folder / "a" / "noise.jpg", tmp_path)
    listing.write_text(f"# a comment\n\n{rel}\n{folder / 'notes.jpg'}\n")
    got = find_images([str(listing), str(folder / "b" / "**" / "*.png"), str(folder / "a" / "noise.jpg")])
    pngs = sorted(str(p) for p in (folder / "b").rglob("*.png"))
    assert got == [os.path.join(str(tmp_path), rel), str(folder / "notes.jpg")] + pngs + [str(folder / "a" / "noise.jpg")]
    for missing in (str(tmp_path / "nope"), str(tmp_path / "*.nothing")):
        with pytest.raises(fastmvit.InputError, match="nope|matches no file"):
            find_images([missing])


def test_progress_lines_when_not_a_terminal():
    stream = io.StringIO()
    p = Progress(10, stream=stream, mode="auto", interval=0)
    p.update(4, 1)
    p.close()
    assert "5/10 images (50%)" in stream.getvalue() and "1 skipped" in stream.getvalue()


def test_command_line(checkpoint, folder, tmp_path):
    """As a user runs it: text to stdout without --output, exit 1 when files were skipped, no traceback."""
    r = subprocess.run([sys.executable, "-m", "fastmvit", "predict", str(folder / "a"), str(folder / "notes.jpg"),
                        "--model", MODEL, "--weights", checkpoint, "--input-size", str(INPUT_SIZE), "--workers", "0"],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    out = r.stdout.splitlines()
    assert out[out.index(str(folder / "notes.jpg")) + 1].startswith("  skipped: ") and "not an image" in r.stdout
    assert sum(line.endswith((".jpg", ".png")) for line in out) == 7


def test_ray_option_takes_an_address_only_when_it_looks_like_one():
    from fastmvit.offline.cli import _split_ray_address

    assert _split_ray_address(["--ray", "photos/", "-o", "x"]) == ["--ray=local", "photos/", "-o", "x"]
    assert _split_ray_address(["photos/", "--ray"]) == ["photos/", "--ray=local"]
    assert _split_ray_address(["--ray", "auto", "photos/"]) == ["--ray=auto", "photos/"]
    assert _split_ray_address(["--ray", "ray://head:10001", "p"]) == ["--ray=ray://head:10001", "p"]
    assert _split_ray_address(["--ray", "10.0.0.1:6379", "p"]) == ["--ray=10.0.0.1:6379", "p"]


def test_progress_bar_with_tqdm():
    pytest.importorskip("tqdm")
    stream = io.StringIO()
    p = Progress(10, stream=stream, mode="bar")
    p.update(4, 1)
    p.close()
    assert p.bar is not None and "5/10" in stream.getvalue() and "skipped=1" in stream.getvalue()
