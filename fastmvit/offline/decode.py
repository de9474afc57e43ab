"""Decoding image files in DataLoader worker processes: one fixed-size batch of pixels per batch of paths,
a slot per path, the bad files' slots zero and flagged, so a bad file never shifts or ends a batch."""
from __future__ import annotations

import os
import time
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch

from ..serving.common import ImageDecoder, RequestError

__all__ = ["DecodedBatch", "ImageFiles", "collate", "decode_file"]


def decode_file(path: str, decoder: ImageDecoder) -> Tuple[Optional["object"], Optional[str]]:
    """``(pixels [3, S, S] float32 NumPy, None)`` or ``(None, why it was skipped)``. Never raises for a bad
    file: a job over a million files must not end on one of them."""
    try:
        size = os.path.getsize(path)
        if size > decoder.limits.max_bytes:  # refuse before reading it into memory
            return None, f"a file of {size} bytes exceeds the limit of {decoder.limits.max_bytes} bytes"
        with open(path, "rb") as f:
            data = f.read()
        return decoder.decode(data), None
    except RequestError as e:
        return None, e.message
    except OSError as e:
        return None, f"could not read the file: {e.strerror or e}"
    except Exception as e:  # a decoder bug on one odd file: report it, keep the job going
        return None, f"unexpected error while decoding: {type(e).__name__}: {e}"


class ImageFiles(torch.utils.data.Dataset):
    """``dataset[i]`` -> ``(i, pixels or None, error or None, seconds spent decoding)``."""

    def __init__(self, paths: Sequence[str], decoder: ImageDecoder):
        self.paths = list(paths)
        self.decoder = decoder

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        t0 = time.perf_counter()
        pixels, error = decode_file(self.paths[i], self.decoder)
        return i, pixels, error, time.perf_counter() - t0


class DecodedBatch(NamedTuple):
    """What a worker hands the model loop (a tuple, so DataLoader's pin_memory pins ``pixels``)."""

    positions: List[int]       # index of each slot's path in the job's path list
    pixels: torch.Tensor       # [n, 3, S, S] in the model's dtype; a bad file's slot is zeros
    ok: torch.Tensor           # [n] bool: the slot holds a decoded image
    errors: List[Optional[str]]  # per slot: why the file was skipped, or None
    decode_seconds: float      # summed over the slots, in the worker


def collate(items, shape: Tuple[int, int, int], dtype: torch.dtype) -> DecodedBatch:
    pixels = torch.zeros((len(items),) + tuple(shape), dtype=dtype)
    ok = torch.zeros(len(items), dtype=torch.bool)
    for slot, (_, arr, error, _) in enumerate(items):
        if error is None:
            pixels[slot] = torch.from_numpy(arr)  # cast to the model's dtype here: half the bytes to move for fp16
            ok[slot] = True
    return DecodedBatch([it[0] for it in items], pixels, ok, [it[2] for it in items],
                        sum(it[3] for it in items))
