"""Where results go: JSON Lines or CSV, one line per file in input order, flushed after every batch, and
optionally the pooled features in one ``.npy`` file that grows with the job. ``resume=True`` reads what a
cut-off run wrote and continues it without duplicates."""
from __future__ import annotations

import csv
import json
import os
import struct
from typing import List, Optional, Set, TextIO

import numpy as np

from ..errors import InputError
from .predict import PredictionBatch

__all__ = ["ResultWriter", "JsonlWriter", "CsvWriter", "TextWriter", "FeatureFile", "open_writer", "FORMATS"]

FORMATS = ("jsonl", "csv")


def _drop_partial_last_line(path: str) -> None:
    """A run killed mid-write leaves half a line: cut the file after its last newline."""
    with open(path, "rb+") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        step, end = 1 << 16, size
        while end > 0:
            start = max(0, end - step)
            f.seek(start)
            chunk = f.read(end - start)
            nl = chunk.rfind(b"\n")
            if nl >= 0:
                f.truncate(start + nl + 1)
                return
            end = start
        f.truncate(0)


class FeatureFile:
    """Pooled features as a float32 ``.npy`` of shape ``[rows, num_features]``, appended batch by batch.

    The header has a fixed size and is rewritten after every append, so the file is a valid ``.npy``
    (``np.load``, ``mmap_mode="r"``) whenever the job is between batches. Row ``r`` belongs to the output
    line whose ``feature_row`` is ``r``."""

    HEADER = 128  # bytes, magic and version included

    def __init__(self, path: str, num_features: int, resume_rows: Optional[int] = None):
        self.path, self.num_features = path, num_features
        if resume_rows is None or not os.path.exists(path):
            if resume_rows:
                raise InputError(f"cannot resume: the output has {resume_rows} feature rows but {path} is missing")
            self.f = open(path, "wb+")
            self.rows = 0
            self._write_header()
            return
        self.f = open(path, "rb+")
        try:
            self.f.seek(0)
            version = np.lib.format.read_magic(self.f)
            shape, _, dtype = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)(self.f)
        except (ValueError, OSError) as e:
            raise InputError(f"cannot resume: {path} is not a .npy file written by fastmvit: {e}") from None
        if self.f.tell() != self.HEADER or dtype != np.float32 or len(shape) != 2 or shape[1] != num_features:
            raise InputError(f"cannot resume: {path} holds {dtype} {list(shape)}, not float32 rows of "
                             f"{num_features} features")
        size = os.path.getsize(path)
        stored = (size - self.HEADER) // (4 * num_features)
        if stored < resume_rows:
            raise InputError(f"cannot resume: {path} has {stored} feature rows, the output refers to {resume_rows}")
        self.rows = resume_rows
        self.f.truncate(self.HEADER + 4 * num_features * resume_rows)  # rows written past the last output line
        self._write_header()

    def _write_header(self) -> None:
        text = "{'descr': '<f4', 'fortran_order': False, 'shape': (%d, %d), }" % (self.rows, self.num_features)
        text = text.ljust(self.HEADER - 10 - 1) + "\n"
        self.f.seek(0)
        self.f.write(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text.encode("latin1"))

    def append(self, features: np.ndarray) -> int:
        """Write rows; returns the index of the first one."""
        first = self.rows
        self.f.seek(self.HEADER + 4 * self.num_features * first)
        self.f.write(np.ascontiguousarray(features, dtype="<f4").tobytes())
        self.rows += len(features)
        self._write_header()
        self.f.flush()
        return first

    def close(self) -> None:
        self.f.close()


class ResultWriter:
    """Base of the writers: ``write(batch)`` writes and flushes one batch; ``done`` is the set of paths
    already in the file (after ``resume``)."""

    def __init__(self, top_k: int):
        self.top_k = top_k
        self.done: Set[str] = set()
        self.features: Optional[FeatureFile] = None
        self.feature_rows = 0  # rows the output already refers to

    def write(self, batch: PredictionBatch) -> None:
        first = None
        if self.features is not None and batch.features is not None and len(batch.paths):
            first = self.features.append(batch.features.numpy())  # features first: a line never points past them
        for rec in batch.records():
            row = rec.pop("row", None)
            if first is not None and row is not None:
                rec["feature_row"] = first + row
            self._write_record(rec)
        self._flush()

    def attach_features(self, path: str, num_features: int, resume: bool) -> None:
        self.features = FeatureFile(path, num_features, self.feature_rows if resume else None)

    def _write_record(self, rec: dict) -> None:
        raise NotImplementedError

    def _flush(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        if self.features is not None:
            self.features.close()


class _FileWriter(ResultWriter):
    def __init__(self, path: str, top_k: int, resume: bool, overwrite: bool):
        super().__init__(top_k)
        self.path = path
        exists = os.path.exists(path) and os.path.getsize(path) > 0
        if exists and not resume and not overwrite:
            raise InputError(f"{path} already exists: pass --resume to continue it (skipping the files it has), "
                             f"or --overwrite to replace it")
        if resume and exists:
            _drop_partial_last_line(path)
            with open(path, encoding="utf-8", newline="") as f:
                self._read_existing(f)
            self.f = open(path, "a", encoding="utf-8", newline="")
        else:
            self.f = open(path, "w", encoding="utf-8", newline="")

    def _read_existing(self, f: TextIO) -> None:
        raise NotImplementedError

    def _note_existing(self, path: str, feature_row) -> None:
        self.done.add(path)
        if feature_row not in (None, ""):
            self.feature_rows = max(self.feature_rows, int(feature_row) + 1)

    def _flush(self) -> None:
        self.f.flush()

    def close(self) -> None:
        self.f.close()
        super().close()


class JsonlWriter(_FileWriter):
    """One JSON object per line: ``{"path", "labels", "indices", "scores"[, "feature_row"]}`` or
    ``{"path", "error"}``."""

    def _read_existing(self, f) -> None:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                self._note_existing(rec["path"], rec.get("feature_row"))
            except (ValueError, KeyError, TypeError):
                raise InputError(f"cannot resume: line {n} of {self.path} is not a fastmvit result line") from None

    def _write_record(self, rec: dict) -> None:
        self.f.write(json.dumps(rec, ensure_ascii=False) + "\n")


class CsvWriter(_FileWriter):
    """Columns ``path, label_1, index_1, score_1, ..., label_k, index_k, score_k, error, feature_row``."""

    def columns(self) -> List[str]:
        cols = ["path"]
        for r in range(1, self.top_k + 1):
            cols += [f"label_{r}", f"index_{r}", f"score_{r}"]
        return cols + ["error", "feature_row"]

    def __init__(self, path: str, top_k: int, resume: bool, overwrite: bool):
        self._needs_header = True
        super().__init__(path, top_k, resume, overwrite)
        self.csv = csv.writer(self.f)
        if self._needs_header:
            self.csv.writerow(self.columns())

    def _read_existing(self, f) -> None:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            return
        if header != self.columns():
            raise InputError(f"cannot resume: the columns of {self.path} ({', '.join(header[:4])}, ...) are not "
                             f"those of a top-{self.top_k} run ({', '.join(self.columns()[:4])}, ...)")
        self._needs_header = False
        for row in reader:
            if row:
                self._note_existing(row[0], row[-1])

    def _write_record(self, rec: dict) -> None:
        row = [rec["path"]]
        if "error" in rec:
            row += [""] * (3 * self.top_k) + [rec["error"], ""]
        else:
            for label, index, score in zip(rec["labels"], rec["indices"], rec["scores"]):
                row += [label, index, repr(score)]
            row += [""] * (3 * (self.top_k - len(rec["labels"]))) + ["", rec.get("feature_row", "")]
        self.csv.writerow(row)


class TextWriter(ResultWriter):
    """For a terminal: each path, then its classes with percentages (or why it was skipped)."""

    def __init__(self, top_k: int, stream: TextIO):
        super().__init__(top_k)
        self.stream = stream

    def _write_record(self, rec: dict) -> None:
        lines = [rec["path"]]
        if "error" in rec:
            lines.append(f"  skipped: {rec['error']}")
        else:
            lines += [f"  {s:6.2%}  {label}  ({i})" for label, i, s in zip(rec["labels"], rec["indices"], rec["scores"])]
        self.stream.write("\n".join(lines) + "\n")

    def _flush(self) -> None:
        self.stream.flush()


def open_writer(path: str, top_k: int, *, fmt: Optional[str] = None, resume: bool = False,
                overwrite: bool = False) -> ResultWriter:
    """A writer for ``path``: ``fmt`` "jsonl" or "csv", or None to take it from the extension (.csv is CSV,
    anything else JSON Lines)."""
    fmt = fmt or ("csv" if path.lower().endswith(".csv") else "jsonl")
    if fmt not in FORMATS:
        raise InputError(f"output format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    return (CsvWriter if fmt == "csv" else JsonlWriter)(path, top_k, resume, overwrite)
