"""Fixtures of the offline tests: an image-sensitive checkpoint and a folder of real image files, good and bad."""
import os

import numpy as np
import pytest
import torch

from ..serving.helpers import encode, good_images, write_checkpoint


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """One intra-op thread: the decode workers run beside the model, and on a busy 2-core machine two
    OpenMP threads spinning against them made each forward 30-60x slower (measured: 3-7 s vs 0.1 s for xxs
    at 128x128)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("offline") / "xxs.safetensors")


# bad file -> what its error must say
BAD = {
    "broken/truncated.jpg": "truncated",
    "notes.jpg": "not an image",
    "tiny.png": "too small",
    "empty.png": "empty",
}


@pytest.fixture(scope="session")
def folder(tmp_path_factory):
    """Real JPEGs and PNGs of odd sizes (grey, RGBA among them) in nested folders, and four bad files in
    between them, so bad slots fall in the middle of batches."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(7)
    files = {f"a/{name}": data for name, data in good_images().items()}
    for i in range(8):
        h, w = 40 + 13 * i, 120 - 9 * i
        arr = (rng.random((h, w, 3)) * 255).astype(np.uint8)
        files[f"b/c/img{i:02d}.{'jpg' if i % 2 else 'png'}"] = encode(arr, "JPEG" if i % 2 else "PNG")
    jpeg = good_images()["gradient.jpg"]
    files["broken/truncated.jpg"] = jpeg[: len(jpeg) // 2]
    files["notes.jpg"] = b"this is a text file with an image extension\n"
    files["tiny.png"] = encode(np.zeros((8, 8, 3), np.uint8), "PNG")
    files["empty.png"] = b""
    files["a/readme.md"] = b"not picked up by a folder walk"
    files["a/.hidden.jpg"] = b"hidden files are skipped"
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def image_files(root):
    """What a folder walk should find, independently of fastmvit: every image-extension file, hidden ones aside."""
    out = []
    for dirpath, _, names in os.walk(root):
        out += [os.path.join(dirpath, n) for n in names
                if not n.startswith(".") and n.rsplit(".", 1)[-1] in ("jpg", "png")]
    return sorted(out)
