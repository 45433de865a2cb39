"""A compressed or structured input (JSONL, `.gz`, `.zst`, Parquet, a saved Hugging Face
dataset) turned once into a plain document file the text source memory-maps like raw text.

The text source reads documents by byte offsets into one memory-mapped file, and hands
tokenizers plain text files to train on. A JSON record's text may hold newlines, so the
document file is not "one document per line": it is every document's text followed by a
newline, with the (start, end) offsets of each document written beside it, so a record
stays one document and a tokenizer trained on the file sees its text as it is.

The copy lives in the run directory's data cache (`<run_dir>/data/documents/`), named by a
hash of the input's identity (each file's resolved path, size and modification time — a
saved dataset is a directory of files), its format, the key read and this layout's
version: an input that changes is converted again under a new name, an unchanged one is
reused. The text and the offsets are written under temporary names and renamed, the
offsets last, so a half-written copy is never taken for a whole one. Documents come out
in input order, so the same input gives the same documents, hence the same samples, as
the equivalent raw text would.
"""
from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np

from mega.checkpoint.atomic import atomic_path
from mega.errors import DataError
from mega.documents import format_of, input_identity, iter_documents
from mega.plugins.data.text_index import TextMemMapIndex

log = logging.getLogger("mega.data")
LAYOUT_VERSION = 1


def _text(stem: Path) -> Path:
    return Path(f"{stem}.txt")


def _offsets(stem: Path) -> Path:
    return Path(f"{stem}.offsets.npy")


def document_file_stem(path: Path, key: str, cache_dir: Path) -> Path:
    identity = json.dumps([LAYOUT_VERSION, format_of(path), key, input_identity(path)])
    digest = hashlib.sha256(identity.encode()).hexdigest()[:16]
    return cache_dir / "documents" / f"{Path(path).name}.{digest}"


def convert(path: Path, key: str, stem: Path, key_name: str) -> None:
    """Write `stem`.txt (each document + newline) and `stem`.offsets.npy (their offsets)."""
    log.info("reading the documents of %s into %s", path, _text(stem))
    stem.parent.mkdir(parents=True, exist_ok=True)
    offsets = []
    position = 0
    with atomic_path(_text(stem)) as tmp:
        with open(tmp, "wb") as out:
            for text in iter_documents(path, key, key_name):
                data = text.encode("utf-8", errors="replace")  # a lone surrogate a JSON string may hold
                out.write(data + b"\n")
                offsets.append((position, position + len(data)))
                position += len(data) + 1
        if not offsets:
            raise DataError(f"{path}: no documents (no non-empty {key!r} values)")
    with atomic_path(_offsets(stem), suffix=".npy") as tmp:  # np.save keeps a name ending in .npy
        np.save(tmp, np.asarray(offsets, dtype=np.int64).reshape(-1, 2))


class DocumentFile(TextMemMapIndex):
    """The documents of a converted input: a TextMemMapIndex whose offsets are the ones
    the conversion wrote (documents, not lines). `source` is the input it came from."""

    def __init__(self, text_path: Path, source: Path):
        self.source = Path(source)
        super().__init__(text_path)

    def _load_or_build(self) -> np.ndarray:
        return np.load(Path(str(self.path)[: -len(".txt")] + ".offsets.npy"), mmap_mode="r")

    def __getstate__(self):
        return {**super().__getstate__(), "source": self.source}

    def __setstate__(self, state):
        self.source = state["source"]
        super().__setstate__(state)


def document_file(path: Path, key: str, cache_dir: Optional[Path], key_name: str = "model.data.json_key") -> DocumentFile:
    """The documents of `path` as a DocumentFile, converted on first use."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such data file")
    cache_dir = Path(cache_dir) if cache_dir is not None else Path(tempfile.gettempdir()) / "mega-documents"
    stem = document_file_stem(path, key, cache_dir)
    if not (_offsets(stem).is_file() and _text(stem).is_file()):
        convert(path, key, stem, key_name)
    return DocumentFile(_text(stem), path)
