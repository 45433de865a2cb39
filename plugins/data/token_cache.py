"""The ids of every document of a text file, tokenized once and cached in Megatron's
indexed format (`mega.plugins.data.indexed`), so packing can cut windows across documents
without tokenizing a document again for every sample that touches it.

The cache lives in the run directory (`<run_dir>/data/`), named by a hash of the text
file (path, size, modification time) and of the tokenizer (its class, special ids, files
and the ids of a probe text), so a changed file or tokenizer is tokenized afresh. One
process builds it under a file lock while the other ranks wait, then all map it.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import tempfile
from pathlib import Path
from typing import Optional

from mega.plugins.data.indexed import IndexedDataset, IndexedDatasetWriter, idx_path, optimal_dtype

log = logging.getLogger("mega.data")
PROBE = "The quick brown fox: 0123456789, ünïcödé; {}[]()!?\n\tend."
CACHE_VERSION = 1


def tokenizer_fingerprint(tokenizer) -> str:
    h = hashlib.sha256()
    h.update(f"{type(tokenizer).__module__}.{type(tokenizer).__qualname__}".encode())
    h.update(repr((tokenizer.vocab_size, tokenizer.eos_id, tokenizer.pad_id)).encode())
    for key, path in sorted(tokenizer.artifacts().items()):
        h.update(key.encode())
        h.update(Path(path).read_bytes())
    try:  # tokenizers without artifacts (bytes) or options the files don't show
        probe = repr(list(tokenizer.encode(PROBE)))
    except Exception as exc:  # a closed vocabulary without <unk> (the word tokenizer) cannot encode it
        probe = f"cannot encode the probe: {type(exc).__name__}"
    h.update(probe.encode())
    return h.hexdigest()


def cache_prefix(path: Path, tokenizer, cache_dir: Path) -> Path:
    st = path.stat()
    h = hashlib.sha256(repr((CACHE_VERSION, str(path.resolve()), st.st_size, st.st_mtime_ns)).encode())
    h.update(tokenizer_fingerprint(tokenizer).encode())
    return cache_dir / f"{path.name}.{h.hexdigest()[:16]}_text_document"


@contextlib.contextmanager
def _locked(lock: Path):
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def tokenized(index, tokenizer, cache_dir: Optional[Path]) -> IndexedDataset:
    """The documents (lines) of a TextMemMapIndex as ids, each followed by the tokenizer's
    end-of-document id, built on first use."""
    if cache_dir is None:
        cache_dir = Path(tempfile.gettempdir()) / "mega-token-cache"
    prefix = cache_prefix(index.path, tokenizer, Path(cache_dir))
    if not idx_path(prefix).is_file():
        with _locked(Path(f"{prefix}.lock")):
            if not idx_path(prefix).is_file():  # another rank may have built it meanwhile
                _build(index, tokenizer, prefix)
    return IndexedDataset(prefix)


def _build(index, tokenizer, prefix: Path) -> None:
    from tqdm import tqdm

    log.info("tokenizing %d documents of %s into %s", len(index), index.path, prefix)
    eos = tokenizer.eos_id
    with IndexedDatasetWriter(prefix, optimal_dtype(tokenizer.vocab_size)) as writer:
        for i in tqdm(range(len(index)), desc=f"tokenizing {index.path.name}", unit="doc", leave=False,
                      mininterval=1.0, disable=len(index) < 10000):
            writer.add_document(tokenizer.encode(index[i]) + [eos])
        writer.finalize()
