"""`mega preprocess`: tokenize JSONL or text once, in worker processes, into the files of a
data source that reads token ids (`model.data.data_impl = "mmap"`: Megatron-LM's
`.bin`/`.idx`), as Megatron-LM's `tools/preprocess_data.py` does.

* Input: a `.jsonl` file (one JSON object per line; each `--json-keys` key is a document:
  a string, or a list of strings taken as its sentences) or any other file read as text,
  one document per non-empty line (the `text_mmap` convention); either compressed (`.gz`,
  `.zst`); a Parquet file or a directory `datasets.Dataset.save_to_disk` wrote (each
  `--json-keys` key a column). See `mega.plugins.data.document_formats`: a record that
  cannot be read is a DataError naming the file and line (or row).
* Output, per key: `PREFIX_KEY_document.bin`/`.idx` (Megatron's names), written by the data
  source's writer (`mega.protocols.WritesDocuments`) through temporary names.
* Tokenizer: the `model.tokenizer` table of an experiment (`--config EXP.toml`; a tokenizer
  the run trained is taken from its run directory), changed or given key by key with
  `--tokenizer KEY=VALUE`, or the tokenizer saved in a run or checkpoint
  (`--tokenizer RUN_DIR`).

Documents are tokenized in order by `--workers` processes (results are put back in input
order, so any number of workers writes the same bytes). `--append-eod` ends each non-empty
document with the tokenizer's end-of-document id.
"""
from __future__ import annotations

import logging
import multiprocessing
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import attrs

from mega.errors import ConfigError, DataError
from mega.documents import (
    compression_of,
    format_of,
    iter_lines,
    iter_records,
    json_record,
    type_name,
)
from mega.protocols import WritesDocuments

log = logging.getLogger("mega")

_TOKENIZER = None  # the tokenizer of this (worker) process
_JOB: dict = {}


def tokenizer_config(config_path: Optional[str], pairs: Sequence[str], plugins):
    """(the `model.tokenizer` config, the run directory whose trained tokenizer it may use)
    from an experiment file and/or KEY=VALUE pairs, structured as `mega run` would."""
    from mega.config import config_from_dict, load_raw
    from mega.training.run_dir import run_dir_of

    raw = load_raw(config_path) if config_path else {}
    overrides = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--tokenizer {pair!r}: expected KEY=VALUE (a model.tokenizer key) or a run directory")
        overrides.append(f"model.tokenizer.{key}={value}")
    config = config_from_dict(raw, overrides, plugins=plugins, source=config_path or "--tokenizer")
    run_dir = run_dir_of(config) if config_path else None
    return config.model.tokenizer, run_dir if run_dir is not None and run_dir.is_dir() else None


def tokenizer_config_of_checkpoint(path: str, plugins):
    """The `model.tokenizer` config of a run directory or checkpoint, its files pointing
    at the copies the checkpoint holds."""
    from mega.checkpoint import checkpoint_tokenizer_files, resolve_checkpoint
    from mega.config import config_from_dict, load_raw

    ckpt = resolve_checkpoint(path)
    config = config_from_dict(load_raw(ckpt / "config.toml"), plugins=plugins, source=str(ckpt / "config.toml"))
    tok = config.model.tokenizer
    files = checkpoint_tokenizer_files(ckpt, attrs.asdict(tok))
    return attrs.evolve(tok, **{k: str(v.resolve()) for k, v in files.items()})


def build_tokenizer(tok_cfg, run_dir: Optional[Path], plugins=None):
    if plugins is None:
        from mega.plugin_manager import get_plugins

        plugins = get_plugins()
    entry = plugins.tokenizers.get(tok_cfg.library, "model.tokenizer.library")
    return entry.factory(tok_cfg, [], run_dir)


def _set_worker(tokenizer, job: dict) -> None:
    global _TOKENIZER, _JOB
    _TOKENIZER, _JOB = tokenizer, job


def _init_worker(tok_cfg, run_dir, job: dict) -> None:
    _set_worker(build_tokenizer(tok_cfg, run_dir), job)


def _document(value, where: str, key: str) -> List[str]:
    """A document's sentences: a string is one, a list of strings is several."""
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    if not isinstance(value, str):
        kind = "a list holding other things than strings" if isinstance(value, list) else type_name(value)
        raise DataError(f"{where}: {key!r} is {kind}, expected a string or a list of strings (--json-keys)")
    return [value]


def encode_line(item: Tuple[object, object]) -> Tuple[Dict[str, List[int]], Dict[str, List[int]], int]:
    """One input line (or one record of a Parquet file / saved dataset: (where, {key: value}))
    -> ({key: ids}, {key: sentence lengths}, bytes read)."""
    lineno, line = item
    job, tok = _JOB, _TOKENIZER
    if isinstance(line, dict):  # a row, read and keyed already
        nbytes, texts = 0, {key: _document(line[key], lineno, key) for key in job["keys"]}
    elif job["jsonl"]:
        nbytes = len(line.encode("utf-8"))
        if not line.strip():
            return {}, {}, nbytes
        where = f"{job['input']}:{lineno}"
        record = json_record(line, where, job["keys"], "--json-keys")
        texts = {key: _document(record[key], where, key) for key in job["keys"]}
    else:
        nbytes = len(line.encode("utf-8"))
        text = line.rstrip("\r\n").rstrip("\r")
        if not text:
            return {}, {}, nbytes
        texts = {job["keys"][0]: text}
    ids, lens = {}, {}
    for key, text in texts.items():
        sentences = text if isinstance(text, list) else [text]
        doc, sentence_lengths = [], []
        for sentence in sentences:
            s = tok.encode(str(sentence))
            if s:
                doc.extend(s)
                sentence_lengths.append(len(s))
        if doc and job["append_eod"]:
            doc.append(tok.eos_id)
            sentence_lengths[-1] += 1
        ids[key], lens[key] = doc, sentence_lengths
    return ids, lens, nbytes


def _items(path: Path, keys: List[str]):
    """What encode_line takes: (line number, line) of text and JSONL (decompressed; parsed
    in the workers), or (where, record) of Parquet files and saved datasets."""
    if format_of(path) in ("parquet", "hf_dataset"):
        return iter_records(path, keys, "--json-keys")
    return iter_lines(path)


def preprocess(input_path, output_prefix: str, tok_cfg, run_dir: Optional[Path] = None, *, json_keys=("text",),
               workers: int = 1, append_eod: bool = False, data_impl: str = "mmap", plugins=None,
               progress: bool = True) -> List[Path]:
    """Write `{output_prefix}_{key}_document` for each key; return those prefixes."""
    from tqdm import tqdm

    if plugins is None:
        from mega.plugin_manager import get_plugins

        plugins = get_plugins()
    input_path = Path(input_path).expanduser()
    if not input_path.exists():
        raise DataError(f"--input {input_path}: no such file")
    if workers < 1:
        raise ConfigError(f"--workers {workers}: must be at least 1")
    entry = plugins.datasets.get(data_impl, "--data-impl")
    if not isinstance(entry.factory, WritesDocuments):
        raise ConfigError(f"--data-impl {data_impl}: that data source reads no pre-tokenized files (no document_writer)")
    kind = format_of(input_path)
    jsonl = kind == "jsonl"
    keys = list(json_keys) if kind != "text" else list(json_keys)[:1]
    # the bar counts bytes of a plain file, records of anything compressed or columnar
    plain = kind in ("text", "jsonl") and compression_of(input_path) is None
    tokenizer = build_tokenizer(tok_cfg, run_dir, plugins)
    job = {"jsonl": jsonl, "keys": keys, "append_eod": append_eod, "input": str(input_path)}
    prefixes = [Path(f"{output_prefix}_{key}_document") for key in keys]
    writers = {key: entry.factory.document_writer(p, tokenizer.vocab_size) for key, p in zip(keys, prefixes)}
    pool = None
    try:
        if workers == 1:
            _set_worker(tokenizer, job)
            results = map(encode_line, _items(input_path, keys))
        else:
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            pool = multiprocessing.get_context(method).Pool(workers, initializer=_init_worker,
                                                            initargs=(tok_cfg, run_dir, job))
            results = pool.imap(encode_line, _items(input_path, keys), chunksize=32)
        docs = tokens = 0
        with tqdm(total=input_path.stat().st_size if plain else None, unit="B" if plain else " records",
                  unit_scale=plain, desc=f"tokenizing {input_path.name}", disable=not progress, file=sys.stderr,
                  mininterval=0.5) as bar:
            for ids, lens, nbytes in results:
                bar.update(nbytes if plain else 1)
                if not ids:
                    continue
                docs += 1
                for key in keys:
                    writers[key].add_document(ids[key], lens[key])
                    tokens += len(ids[key])
        if docs == 0:
            raise DataError(f"--input {input_path}: no documents")
        for w in writers.values():
            w.finalize()
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    log.info("%d documents, %d tokens from %s", docs, tokens, input_path)
    return prefixes


def preprocess_command(args) -> int:
    from mega.plugin_manager import get_plugins

    plugins = get_plugins()
    run_paths = [t for t in args.tokenizer if "=" not in t]
    if run_paths:
        if len(run_paths) > 1 or len(args.tokenizer) > 1 or args.config:
            raise ConfigError("--tokenizer RUN_DIR: give one run or checkpoint, without --config or KEY=VALUE pairs")
        tok_cfg, run_dir = tokenizer_config_of_checkpoint(run_paths[0], plugins), None
    elif args.config or args.tokenizer:
        tok_cfg, run_dir = tokenizer_config(args.config, args.tokenizer, plugins)
    else:
        raise ConfigError("mega preprocess: say which tokenizer: --config EXPERIMENT.toml, --tokenizer library=NAME"
                          " [--tokenizer KEY=VALUE ...], or --tokenizer RUN_DIR")
    prefixes = preprocess(args.input, args.output_prefix, tok_cfg, run_dir, json_keys=args.json_keys,
                          workers=args.workers, append_eod=args.append_eod, data_impl=args.data_impl, plugins=plugins,
                          progress=not args.quiet)
    for p in prefixes:
        print(f"wrote {p}.bin and {p}.idx (model.data.data_prefix = [\"{p}\"], data_impl = \"{args.data_impl}\")")
    return 0
