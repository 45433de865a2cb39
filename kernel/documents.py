"""Documents from the files users already have, read one by one with where each came from:
what `mega preprocess` tokenizes and the text source (`text_mmap`) trains on, and what a
data plugin may read too (`mega.PLUGIN_API`).

| input                                   | a document is                                        |
|-----------------------------------------|------------------------------------------------------|
| any other file (`.txt`, ...)            | a non-empty line                                     |
| `.jsonl`, `.json`, `.ndjson`            | the string under the JSON key of each line's object  |
| `X.gz`, `X.zst` (X one of the above)    | as X, decompressed while read (gzip: the standard library; zstd: Python 3.14's `compression.zstd`, else the `zstandard` package, `mega-lm[zstd]`) |
| `.parquet`                              | the string in the key's column of each row (`pyarrow`, `mega-lm[datasets]`) |
| a directory `Dataset.save_to_disk` wrote | the string in the key's column of each row (`datasets.load_from_disk`, `mega-lm[datasets]`) |

The key is Megatron-LM's `--json-keys` (`mega preprocess --json-keys`, the text source's
`model.data.json_key`), "text" by default. A record that cannot be read (a line that is not
a JSON object, a missing key, a value that is not a string, a null) is a DataError naming
the file and the line (or row); so are a corrupt compressed stream and text that is not
UTF-8. A package a format needs and that is not installed is named with its extra.
"""
from __future__ import annotations

import gzip
import io
import json
import zlib
from pathlib import Path
from typing import Iterator, Optional, Sequence, Tuple

from mega.errors import DataError

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd"}
BATCH_ROWS = 4096


def compression_of(path: Path) -> Optional[str]:
    return COMPRESSIONS.get(Path(path).suffix.lower())


def format_of(path: Path) -> str:
    """"text", "jsonl", "parquet" or "hf_dataset" (the container, whatever its compression)."""
    path = Path(path)
    if path.is_dir():
        return "hf_dataset"
    name = path.name.lower()
    if compression_of(path):
        name = name[: -len(path.suffix)]
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    return "text"


def needs_conversion(path: Path) -> bool:
    """Whether the text source must turn `path` into a document file first (everything but
    plain, uncompressed text, which is memory-mapped where it is)."""
    return format_of(path) != "text" or compression_of(path) is not None


# --- byte streams --------------------------------------------------------------------------

def _zstd_reader(path: Path):
    try:
        from compression import zstd  # Python 3.14's standard library

        return zstd.open(path, "rb")
    except ImportError:
        pass
    try:
        import zstandard
    except ImportError:
        raise DataError(f"{path}: reading .zst needs the zstandard package: pip install 'mega-lm[zstd]'") from None
    return zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)


def _stream_errors() -> tuple:
    errors = [OSError, EOFError, zlib.error]
    try:
        import zstandard

        errors.append(zstandard.ZstdError)
    except ImportError:
        pass
    return tuple(errors)


def iter_lines(path: Path) -> Iterator[Tuple[int, str]]:
    """(line number from 1, line with its newline) of a text file, decompressed as its
    suffix says; DataErrors name the file and the line."""
    path = Path(path)
    kind = compression_of(path)
    if kind == "gzip":
        raw = gzip.open(path, "rb")
    elif kind == "zstd":
        raw = _zstd_reader(path)
    else:
        raw = open(path, "rb")
    lineno = 0
    try:
        with io.BufferedReader(raw) if kind == "zstd" and not hasattr(raw, "peek") else raw as stream:
            for lineno, data in enumerate(stream, 1):  # bytes up to each b"\n", decoded line by line
                try:
                    line = data.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise DataError(f"{path}:{lineno}: not UTF-8 text ({exc.reason} at byte {exc.start} of the line)") from None
                yield lineno, line
    except _stream_errors() as exc:
        raise DataError(f"{path}: cannot read it as {kind or 'a file'} near line {lineno + 1}: {exc}") from None


# --- records --------------------------------------------------------------------------------

def type_name(value) -> str:
    return {dict: "an object", list: "a list", bool: "a boolean", int: "a number", float: "a number",
            type(None): "null"}.get(type(value), type(value).__name__)


def json_record(line: str, where: str, keys: Sequence[str], key_name: str) -> dict:
    """The values of `keys` in one JSONL line (an object), or a DataError at `where`."""
    try:
        data = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: not a JSON object ({exc.msg} at column {exc.colno})") from None
    if not isinstance(data, dict):
        raise DataError(f"{where}: not a JSON object but {type_name(data)}")
    missing = [k for k in keys if k not in data]
    if missing:
        raise DataError(f"{where}: no key {missing[0]!r} ({key_name}); the object has {', '.join(map(repr, data)) or 'none'}")
    return {k: data[k] for k in keys}


def text_value(value, where: str, key: str) -> str:
    """A document's text, or a DataError naming the record and the key."""
    if not isinstance(value, str):
        raise DataError(f"{where}: {key!r} is {type_name(value)}, expected a string")
    return value


def _columns(path: Path, names: Sequence[str], keys: Sequence[str], key_name: str) -> None:
    missing = [k for k in keys if k not in names]
    if missing:
        raise DataError(f"{path}: no column {missing[0]!r} ({key_name}); its columns: {', '.join(names)}")


def _parquet_rows(path: Path, keys: Sequence[str], key_name: str) -> Iterator[Tuple[str, dict]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow: pip install 'mega-lm[datasets]'") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError for a file that is no Parquet
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
    _columns(path, pf.schema_arrow.names, keys, key_name)
    row = 0
    for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=list(keys)):
        columns = {k: batch.column(k).to_pylist() for k in keys}
        for i in range(batch.num_rows):
            yield f"{path}: row {row + i + 1}", {k: columns[k][i] for k in keys}
        row += batch.num_rows


def _hf_dataset_rows(path: Path, keys: Sequence[str], key_name: str) -> Iterator[Tuple[str, dict]]:
    if (path / "dataset_dict.json").is_file():
        splits = sorted(p.name for p in path.iterdir() if p.is_dir())
        raise DataError(f"{path}: a DatasetDict ({', '.join(splits)}); give one split's directory, e.g."
                        f" {path / (splits[0] if splits else 'train')}")
    if not (path / "state.json").is_file():
        raise DataError(f"{path}: a directory, but not one Dataset.save_to_disk wrote (no state.json)")
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path}: reading a Hugging Face dataset needs the datasets package:"
                        " pip install 'mega-lm[datasets]'") from None
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:  # datasets raises FileNotFoundError / its own errors for damaged directories
        raise DataError(f"{path}: cannot load the saved dataset ({type(exc).__name__}: {exc})") from None
    _columns(path, ds.column_names, keys, key_name)
    row = 0
    for batch in ds.select_columns(list(keys)).iter(batch_size=BATCH_ROWS):
        n = len(batch[keys[0]])
        for i in range(n):
            yield f"{path}: row {row + i + 1}", {k: batch[k][i] for k in keys}
        row += n


def iter_records(path: Path, keys: Sequence[str], key_name: str) -> Iterator[Tuple[str, dict]]:
    """(where, {key: value}) for every record of a JSONL, Parquet or saved-dataset input
    (compressed JSONL too); blank JSONL lines are skipped. Values are as stored: the
    caller checks their type (`text_value`)."""
    path = Path(path)
    kind = format_of(path)
    if kind == "parquet":
        yield from _parquet_rows(path, keys, key_name)
    elif kind == "hf_dataset":
        yield from _hf_dataset_rows(path, keys, key_name)
    elif kind == "jsonl":
        for lineno, line in iter_lines(path):
            if line.strip():
                where = f"{path}:{lineno}"
                yield where, json_record(line, where, keys, key_name)
    else:
        raise DataError(f"{path}: not a JSONL, Parquet or saved-dataset input")


def iter_documents(path: Path, key: str = "text", key_name: str = "model.data.json_key") -> Iterator[str]:
    """The documents of `path` in order (see the table above); empty ones are skipped, as
    the text source skips empty lines."""
    path = Path(path)
    if format_of(path) == "text":
        for _, line in iter_lines(path):
            line = line[:-1] if line.endswith("\n") else line
            if line:
                yield line
        return
    for where, record in iter_records(path, [key], key_name):
        text = text_value(record[key], where, key)
        if text:
            yield text


def input_identity(path: Path) -> list:
    """What a converted copy of `path` depends on: every file's resolved path, size and
    modification time (a saved dataset is a directory of files)."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    out = []
    for f in files:
        st = f.stat()
        out.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
    return out
