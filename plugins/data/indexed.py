"""Megatron-LM's indexed binary dataset (`PREFIX.bin` + `PREFIX.idx`), read and written.

The format, byte for byte, so files made by Megatron-LM's `tools/preprocess_data.py` train
here and files made by `mega preprocess` train there:

* `PREFIX.bin`: every sequence's token ids, one after another, in the index's dtype.
* `PREFIX.idx`, little-endian:

  | bytes | content                                                        |
  |-------|----------------------------------------------------------------|
  | 9     | the magic `MMIDIDX\\x00\\x00`                                    |
  | 8     | version, uint64 = 1                                            |
  | 1     | dtype code, uint8 (1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32, 8 uint16) |
  | 8     | sequence count S, uint64                                       |
  | 8     | document count D, uint64 (documents + 1: it starts with 0)     |
  | 4 S   | sequence lengths (tokens), int32                               |
  | 8 S   | sequence pointers (byte offsets into .bin), int64              |
  | 8 D   | document indices, int64: document d is sequences [idx[d], idx[d+1]) |

A document is one sequence when preprocessed by document (`_document` files); sentence
splitting makes several. Token ids are uint16 when the vocabulary has fewer than 65,500
entries, else int32 (Megatron's rule). Everything is memory-mapped: opening a file reads
only its header.
"""
from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

from mega.errors import DataError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16}
CODES = {np.dtype(v): k for k, v in DTYPES.items()}
HEADER_BYTES = len(MAGIC) + 8 + 1 + 8 + 8


def optimal_dtype(vocab_size: Optional[int]) -> type:
    """uint16 for vocabularies under 65,500 ids, else int32 (as Megatron-LM chooses)."""
    return np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32


def bin_path(prefix) -> Path:
    return Path(f"{prefix}.bin")


def idx_path(prefix) -> Path:
    return Path(f"{prefix}.idx")


def write_index(path: Path, dtype, sequence_lengths: Sequence[int], document_indices: Sequence[int]) -> None:
    """The .idx file for sequences of `sequence_lengths` tokens of `dtype` stored back to back."""
    lengths = np.asarray(sequence_lengths, dtype=np.int32)
    pointers = np.zeros(len(lengths), dtype=np.int64)
    if len(lengths) > 1:
        pointers[1:] = np.cumsum(lengths[:-1], dtype=np.int64) * np.dtype(dtype).itemsize
    docs = np.asarray(document_indices, dtype=np.int64)
    with open(path, "wb") as f:
        f.write(MAGIC)
        f.write(struct.pack("<Q", VERSION))
        f.write(struct.pack("<B", CODES[np.dtype(dtype)]))
        f.write(struct.pack("<Q", len(lengths)))
        f.write(struct.pack("<Q", len(docs)))
        f.write(lengths.tobytes(order="C"))
        f.write(pointers.tobytes(order="C"))
        f.write(docs.tobytes(order="C"))


class IndexedDatasetWriter:
    """Writes `PREFIX.bin`/`.idx` through temporary names, renamed into place by `finalize`
    (the .idx last, so a prefix whose .idx exists is complete). Use as a context manager:
    an exception removes the temporary files."""

    def __init__(self, prefix, dtype=np.int32):
        self.prefix, self.dtype = str(prefix), np.dtype(dtype)
        if self.dtype not in CODES:
            raise DataError(f"{prefix}: token dtype {self.dtype} has no code in the indexed format")
        self._tmp = f".tmp{os.getpid()}"
        self._bin_tmp = Path(str(bin_path(self.prefix)) + self._tmp)
        self._bin_tmp.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self._bin_tmp, "wb")
        self.sequence_lengths: List[int] = []
        self.document_indices: List[int] = [0]
        self._limit = np.iinfo(self.dtype).max if self.dtype.kind in "iu" else None

    def add_document(self, ids, sequence_lengths: Optional[Sequence[int]] = None) -> None:
        """One document: its ids, made of sequences of `sequence_lengths` tokens (default:
        one sequence; an empty document has none)."""
        arr = np.asarray(ids)
        if self._limit is not None and arr.size and (arr.max() > self._limit or arr.min() < 0):
            raise DataError(f"{self.prefix}: token id {int(arr.max())} does not fit the index dtype {self.dtype}")
        lengths = ([arr.size] if arr.size else []) if sequence_lengths is None else list(sequence_lengths)
        if sum(lengths) != arr.size:
            raise DataError(f"{self.prefix}: sequence lengths {lengths} do not add up to the {arr.size} ids given")
        self._file.write(arr.astype(self.dtype, copy=False).tobytes(order="C"))
        self.sequence_lengths.extend(int(n) for n in lengths)
        self.document_indices.append(len(self.sequence_lengths))

    def finalize(self) -> Path:
        self._file.close()
        idx_tmp = Path(str(idx_path(self.prefix)) + self._tmp)
        write_index(idx_tmp, self.dtype, self.sequence_lengths, self.document_indices)
        os.replace(self._bin_tmp, bin_path(self.prefix))
        os.replace(idx_tmp, idx_path(self.prefix))
        return Path(self.prefix)

    def abort(self) -> None:
        self._file.close()
        for p in (self._bin_tmp, Path(str(idx_path(self.prefix)) + self._tmp)):
            p.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
        return None


class IndexedDataset:
    """Random access to the sequences of `PREFIX.bin`/`.idx`, memory-mapped."""

    def __init__(self, prefix):
        self.prefix = str(prefix)
        self._open()

    def _open(self) -> None:
        ip, bp = idx_path(self.prefix), bin_path(self.prefix)
        for p in (ip, bp):
            if not p.is_file():
                raise DataError(f"{p}: no such file (model.data.data_prefix names PREFIX of PREFIX.bin and PREFIX.idx)")
        with open(ip, "rb") as f:
            head = f.read(HEADER_BYTES)
        if len(head) < HEADER_BYTES or head[: len(MAGIC)] != MAGIC:
            raise DataError(f"{ip}: not a Megatron indexed dataset index (bad magic {head[:len(MAGIC)]!r})")
        version, = struct.unpack_from("<Q", head, 9)
        if version != VERSION:
            raise DataError(f"{ip}: index version {version}; only version {VERSION} is known")
        code, = struct.unpack_from("<B", head, 17)
        if code not in DTYPES:
            raise DataError(f"{ip}: unknown dtype code {code}")
        self.dtype = np.dtype(DTYPES[code])
        n_seq, n_doc = struct.unpack_from("<QQ", head, 18)
        expected = HEADER_BYTES + 4 * n_seq + 8 * n_seq + 8 * n_doc
        if ip.stat().st_size < expected:
            raise DataError(f"{ip}: truncated ({ip.stat().st_size} bytes, the header promises {expected})")
        index = np.memmap(ip, dtype=np.uint8, mode="r")
        self.sequence_lengths = np.frombuffer(index, dtype=np.int32, count=n_seq, offset=HEADER_BYTES)
        self.sequence_pointers = np.frombuffer(index, dtype=np.int64, count=n_seq, offset=HEADER_BYTES + 4 * n_seq)
        self.document_indices = np.frombuffer(index, dtype=np.int64, count=n_doc, offset=HEADER_BYTES + 12 * n_seq)
        self._index = index
        data_bytes = bp.stat().st_size
        if n_seq:
            end = int(self.sequence_pointers[-1]) + int(self.sequence_lengths[-1]) * self.dtype.itemsize
            if end > data_bytes:
                raise DataError(f"{bp}: truncated ({data_bytes} bytes, {ip} points to byte {end})")
        self._bin = np.memmap(bp, dtype=np.uint8, mode="r") if data_bytes else np.zeros(0, np.uint8)

    @property
    def num_documents(self) -> int:
        return max(len(self.document_indices) - 1, 0)

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    def get(self, i: int, offset: int = 0, length: Optional[int] = None) -> np.ndarray:
        """Tokens [offset, offset + length) of sequence `i` (a view of the map)."""
        n = int(self.sequence_lengths[i])
        length = n - offset if length is None else length
        start = int(self.sequence_pointers[i]) + offset * self.dtype.itemsize
        return np.frombuffer(self._bin, dtype=self.dtype, count=length, offset=start)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.get(int(i))

    def __getstate__(self):  # picklable: reopen the maps in the other process
        return {"prefix": self.prefix}

    def __setstate__(self, state):
        self.prefix = state["prefix"]
        self._open()
