"""Which files a job reads: folders (recursive), glob patterns and list files, expanded to one ordered list
of image paths."""
from __future__ import annotations

import glob
import os
from typing import Iterable, List, Union

from ..errors import InputError

__all__ = ["IMAGE_EXTENSIONS", "LIST_EXTENSIONS", "find_images", "read_list_file"]

# What a folder walk picks up. A file named explicitly (or in a list) is read whatever its extension.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jfif", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff",
                              ".ppm", ".pgm", ".pbm"})
# A source with one of these extensions is a list of image paths, one per line.
LIST_EXTENSIONS = frozenset({".txt", ".lst", ".list"})

Source = Union[str, os.PathLike]


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _walk(folder: str) -> List[str]:
    found = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(os.path.join(root, f) for f in sorted(files) if _is_image_name(f))
    return found


def read_list_file(path: Source) -> List[str]:
    """Paths from a list file: one per line; blank lines and lines starting with # are ignored; relative
    paths are relative to the list file's folder."""
    base = os.path.dirname(os.path.abspath(path))
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read the list file {path}: {e}") from None
    paths = []
    for line in lines:
        line = line.strip()
        if line and not line.startswith("#"):
            paths.append(line if os.path.isabs(line) else os.path.join(base, line))
    return paths


def find_images(sources: Union[Source, Iterable[Source]]) -> List[str]:
    """Expand folders (recursively, image extensions only, hidden entries skipped, sorted), glob patterns
    (``"photos/**/*.jpg"``) and list files (``.txt``, ``.lst``, ``.list``) into image paths, in the order
    given, each path once. A file named directly is kept whatever its extension: whether it is an image
    is found out when it is decoded.

    Raises InputError for a source that is none of these (no such file or folder, a pattern matching
    nothing)."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    paths: List[str] = []
    for src in sources:
        src = os.fspath(src)
        if os.path.isdir(src):
            paths.extend(_walk(src))
        elif os.path.isfile(src):
            if os.path.splitext(src)[1].lower() in LIST_EXTENSIONS:
                paths.extend(read_list_file(src))
            else:
                paths.append(src)
        elif glob.has_magic(src):
            matches = sorted(glob.glob(src, recursive=True))
            if not matches:
                raise InputError(f"the pattern {src!r} matches no file")
            for m in matches:
                if os.path.isdir(m):
                    paths.extend(_walk(m))
                elif os.path.isfile(m):
                    paths.append(m)
        else:
            raise InputError(f"{src!r} is not a file, a folder or a glob pattern that exists; give image files, "
                             f"folders, patterns such as 'photos/**/*.jpg', or list files (.txt, one path a line)")
    return list(dict.fromkeys(paths))  # each path once, first occurrence kept
