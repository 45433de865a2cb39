"""A memory-mapped index of the lines of a raw text file.

Each non-empty line is a document. The index (start and end byte offsets, int64) is built
once, in chunks so files larger than memory work, and cached beside the file as
`<file>.mega-index.npy` with a JSON stamp of the file's size and mtime; a changed file is
re-indexed. Where the file's folder is read-only the index is kept in memory.
"""
from __future__ import annotations

import json
import logging
import mmap
import os
from pathlib import Path

import numpy as np

from mega.checkpoint.atomic import atomic_path, atomic_write_text
from mega.errors import DataError

log = logging.getLogger("mega.data")
INDEX_VERSION = 1
CHUNK = 64 << 20


def _stamp(path: Path) -> dict:
    st = path.stat()
    return {"version": INDEX_VERSION, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def build_line_offsets(path: Path) -> np.ndarray:
    """[n, 2] int64 (start, end) byte offsets of the non-empty lines of `path`."""
    size = path.stat().st_size
    if size == 0:
        raise DataError(f"{path}: data file is empty")
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        data = np.frombuffer(mm, dtype=np.uint8)
        newlines = [np.flatnonzero(data[o:o + CHUNK] == 10) + o for o in range(0, size, CHUNK)]
        del data
    ends = np.concatenate(newlines + [np.array([size], dtype=np.int64)]).astype(np.int64)
    starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64)
    keep = ends > starts  # drop empty lines (and the empty tail after a final newline)
    offsets = np.stack([starts[keep], ends[keep]], axis=1)
    if len(offsets) == 0:
        raise DataError(f"{path}: data file has no non-empty lines")
    return offsets


class TextMemMapIndex:
    """Random access to the documents (lines) of one text file without reading it whole."""

    def __init__(self, path: os.PathLike | str):
        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise DataError(f"{self.path}: no such data file")
        if not os.access(self.path, os.R_OK):
            raise DataError(f"{self.path}: data file is not readable")
        self.offsets = self._load_or_build()
        self._file = self.path.open("rb")
        self._mm = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)

    @property
    def index_path(self) -> Path:
        return self.path.with_name(self.path.name + ".mega-index.npy")

    @property
    def stamp_path(self) -> Path:
        return self.path.with_name(self.path.name + ".mega-index.json")

    def _load_or_build(self) -> np.ndarray:
        stamp = _stamp(self.path)
        try:
            if json.loads(self.stamp_path.read_text()) == stamp:
                return np.load(self.index_path, mmap_mode="r")
        except (OSError, ValueError):
            pass
        log.info("indexing lines of %s (%.1f MB)", self.path, stamp["size"] / 1e6)
        offsets = build_line_offsets(self.path)
        try:
            with atomic_path(self.index_path, suffix=".npy") as tmp:  # np.save keeps a name ending in .npy
                np.save(tmp, offsets)
            atomic_write_text(self.stamp_path, json.dumps(stamp))
        except OSError as exc:
            log.warning("cannot cache the line index beside %s (%s); keeping it in memory", self.path, exc)
        return offsets

    def __len__(self) -> int:
        return len(self.offsets)

    def lines_longer_than(self, limit: int) -> tuple:
        """(how many lines are longer than `limit` bytes, the longest line's length in bytes):
        read from the index, without touching the text."""
        lengths = np.asarray(self.offsets[:, 1] - self.offsets[:, 0])
        return int((lengths > limit).sum()), int(lengths.max()) if len(lengths) else 0

    def __getitem__(self, i: int) -> str:
        start, end = self.offsets[i]
        return self._mm[int(start):int(end)].decode("utf-8", errors="replace").rstrip("\r")

    def __getstate__(self):  # picklable for DataLoader workers: reopen the map there
        return {"path": self.path, "offsets": np.asarray(self.offsets)}

    def __setstate__(self, state):
        self.path, self.offsets = state["path"], state["offsets"]
        self._file = self.path.open("rb")
        self._mm = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
