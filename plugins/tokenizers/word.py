"""The `word` tokenizer: a word-level vocabulary, as Transformer-XL's reference builds one.

WikiText-103 comes already tokenised into words, so its "tokenizer" is a vocabulary:

* a line is split on whitespace (or on `delimiter`; "" splits into characters), after
  `strip()` and, with `lower_case`, lower-casing;
* counting runs over the files the data source names (lm_ordered: data_dir's train file,
  or its `vocab_splits`), in order, without end-of-line symbols;
* ids: the `special` symbols first (`<eos>` is id 0 by default), then the counted words
  by decreasing count, ties in order of first occurrence (Python's `Counter.most_common`),
  at most `max_size` of them, stopping at the first count below `min_freq`;
* encoding a file turns every line, empty lines included, into its words plus `<eos>`
  (`add_eos`), or `<S>` words `<S>` (`add_double_eos`, the One Billion Word setting);
* a word the vocabulary lacks becomes `<UNK>` when the vocabulary has that symbol (One
  Billion Word's vocabulary file: the reference maps unknown words of a vocab_file to it),
  else `<unk>` when it has that one (WT103 has it as an ordinary word), and is an error
  otherwise (the reference asserts). The rule reads only the symbols, so a counted
  vocabulary maps the same when a checkpoint loads it back as a vocab_file.

The vocabulary is built once, from the files the data source names, into the run
directory (`tokenizer.vocab`, one `symbol<TAB>count` per line, plus a stamp of the files
and options it came from). A second run reuses it; a change of files or options rebuilds
it, unless checkpoints depend on it (`mega.checkpoint.trained_files`). It is the tokenizer's
artifact, so checkpoints carry a copy and `vocab_file` points at it there; `vocab_file`
also loads a vocabulary you give (symbols in file order, the first field of each line, as
the reference's `vocab_file`).

The reference has no padding symbol: `pad_id` is `eos_id` here, so the ids match it;
padded positions carry `<eos>` with loss mask 0. A vocabulary without end symbols
(enwik8's: no specials, `add_eos = false`) has `eos_id = pad_id = 0`, a real symbol, so it
suits only a data source that appends nothing (Transformer-XL's ordered stream).
"""
from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence

import numpy as np
from attrs import define

import mega
from mega.checkpoint import trained_files
from mega.config import key, TokenizerConfig
from mega.config.schema import at_least_one, non_negative
from mega.errors import ConfigError, DataError
from mega.checkpoint.atomic import atomic_write_text

log = logging.getLogger("mega.tokenizer")

EOS, DOUBLE_EOS, UNK = "<eos>", "<S>", "<unk>"
UNKNOWN_SYMBOLS = ("<UNK>", UNK)  # what an unknown word becomes: the first of these the vocabulary has
VOCAB_NAME = "tokenizer.vocab"
LINES_PER_CHUNK = 1 << 16  # lines counted or encoded at once (bounded memory, C-speed inner loops)


@define(kw_only=True)
class WordConfig(TokenizerConfig):
    """`model.tokenizer.*` of the word library. Without `vocab_file` the vocabulary is
    counted from the data source's files into the run directory."""

    library: str = "word"
    vocab_file: Optional[str] = key(None,
            help="a vocabulary to load (a symbol per line: the text before a tab, or the first field); unset: count one")
    special: List[str] = key(factory=lambda: [EOS], help="symbols given the first ids, in order")
    lower_case: bool = key(False, help="lower-case every line before splitting (WT103: false)")
    delimiter: Optional[str] = key(None, help='unset: split on runs of whitespace; "": one symbol per character')
    min_freq: int = key(default=0, validator=non_negative, help="drop words counted fewer times")
    max_size: Optional[int] = key(default=None, validator=at_least_one, help="most frequent words kept (unset: all)")
    add_eos: bool = key(True, help="each line ends with `<eos>` (WT103: true; enwik8, text8: false)")
    add_double_eos: bool = key(False,
            help="each line is `<S>` words `<S>` (One Billion Word); needs `<S>` in `special`")


class WordTokenizer:
    """A fixed word vocabulary (`symbols`, id = position)."""

    def __init__(self, symbols: Sequence[str], config: WordConfig, vocab_file: Path):
        self.ids: Dict[str, int] = {}
        for s in symbols:  # a repeated symbol keeps its first id, as the reference's add_symbol
            self.ids.setdefault(s, len(self.ids))
        self.symbols = list(self.ids)
        self.config = config
        self.vocab_file = Path(vocab_file)
        self.vocab_size = len(self.symbols)
        end = DOUBLE_EOS if config.add_double_eos else EOS
        if end not in self.ids and (config.add_eos or config.add_double_eos):
            raise ConfigError(f"model.tokenizer: the vocabulary {vocab_file} has no {end} symbol"
                              f" (add it to model.tokenizer.special)")
        # without end symbols (enwik8: no specials, add_eos = false) eos_id is 0, a real
        # symbol: only a data source that appends nothing (an ordered stream) fits
        self.eos_id = self.ids.get(end, 0)
        self.pad_id = self.eos_id  # the reference has no padding symbol (module docstring)
        self.unk_id: Optional[int] = next((self.ids[u] for u in UNKNOWN_SYMBOLS if u in self.ids), None)
        self._ids_or_unk = _WithDefault(self.ids, self.unk_id) if self.unk_id is not None else None

    # --- the reference's tokenize -----------------------------------------------------------
    def split(self, line: str) -> List[str]:
        """The symbols of one line, without end symbols."""
        return split_line(line, self.config)

    def _lookup(self, words: Iterable[str]) -> List[int]:
        ids, unk = self.ids, self.unk_id
        if unk is not None:
            return [ids.get(w, unk) for w in words]
        try:
            return [ids[w] for w in words]
        except KeyError as exc:
            raise DataError(f"word {exc.args[0]!r} is not in the vocabulary {self.vocab_file}, which has no"
                            f" {' or '.join(UNKNOWN_SYMBOLS)} symbol to stand for unknown words") from None

    def encode_line(self, line: str) -> List[int]:
        """One line as the reference encodes it: words + <eos> (or <S> words <S>)."""
        words = self._lookup(self.split(line))
        if self.config.add_double_eos:
            return [self.eos_id] + words + [self.eos_id]
        return words + [self.eos_id] if self.config.add_eos else words

    # --- mega.protocols.Tokenizer -----------------------------------------------------------
    def encode(self, text: str) -> List[int]:
        """The ids of `text` without a final end symbol (data sources append `eos_id` to a
        document): each line's words, line breaks as <eos> (as `encode_line` per line)."""
        lines = text.split("\n")
        if len(lines) == 1 and not self.config.add_double_eos:
            return self._lookup(self.split(text))
        out: List[int] = []
        for line in lines:
            out += self.encode_line(line)
        return out[:-1] if out and (self.config.add_eos or self.config.add_double_eos) else out

    def decode(self, ids: Sequence[int]) -> str:
        """Symbols joined by spaces (the delimiter), <eos> as a line break."""
        sep = " " if self.config.delimiter is None else self.config.delimiter
        lines, words = [], []
        for i in ids:
            if i == self.eos_id and self.config.add_eos:
                lines.append(sep.join(words))
                words = []
            elif 0 <= i < self.vocab_size:
                words.append(self.symbols[i])
        return "\n".join(lines + [sep.join(words)])

    def artifacts(self) -> Dict[str, Path]:
        return {"vocab_file": self.vocab_file}

    # --- whole files ------------------------------------------------------------------------
    def encode_file(self, path) -> np.ndarray:
        """Every line of `path` (empty ones too) through `encode_line`, concatenated: the
        reference's `encode_file(ordered=True)`, streamed, as one int64 array."""
        cfg = self.config
        fast = cfg.delimiter is None and cfg.add_eos and not cfg.add_double_eos
        parts = []
        for chunk in _line_chunks(Path(path)):
            if fast:
                # Whitespace splitting of the chunk with each line ending in " <eos> " gives
                # every line's words + <eos> (a literal "<eos>" word has that id anyway).
                text = "".join(chunk)
                if not text.endswith("\n"):  # the file's last line, without a line break
                    text += "\n"
                words = (text.lower() if cfg.lower_case else text).replace("\n", f" {EOS} ").split()
                parts.append(self._array(words))
            else:
                ids: List[int] = []
                for line in chunk:
                    ids += self.encode_line(line)
                parts.append(np.asarray(ids, dtype=np.int64))
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def _array(self, words: List[str]) -> np.ndarray:
        """The ids of `words` as int64, looked up at C speed."""
        table = self.ids if self.unk_id is None else self._ids_or_unk
        try:
            return np.fromiter(map(table.__getitem__, words), dtype=np.int64, count=len(words))
        except KeyError as exc:
            self._lookup([exc.args[0]])  # raises the DataError naming the word
            raise


class _WithDefault(dict):
    """The vocabulary as a dict whose missing words are <unk> (C-speed lookups in `map`)."""

    def __init__(self, ids: Dict[str, int], default: Optional[int]):
        super().__init__(ids)
        self.default = default

    def __missing__(self, key):
        return self.default


def split_line(line: str, config: WordConfig) -> List[str]:
    """The reference's `tokenize` without end symbols: strip, lower-case, split."""
    line = line.strip()
    if config.lower_case:
        line = line.lower()
    if config.delimiter == "":
        return list(line)
    return line.split(config.delimiter)


def _line_chunks(path: Path) -> Iterator[List[str]]:
    """The lines of a text file (universal newlines, as the reference reads), in chunks."""
    try:
        f = open(path, "r", encoding="utf-8")
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from None
    with f:
        while True:
            chunk = f.readlines(LINES_PER_CHUNK * 64)
            if not chunk:
                return
            yield chunk


def count_words(files: Sequence[Path], config: WordConfig) -> Counter:
    """Word counts over `files` (no end symbols), in order of first occurrence."""
    counter: Counter = Counter()
    for path in files:
        for chunk in _line_chunks(Path(path)):
            if config.delimiter is None:
                # whitespace splitting of the joined lines equals per-line strip().split()
                text = "".join(chunk)
                counter.update((text.lower() if config.lower_case else text).split())
            else:
                for line in chunk:
                    counter.update(split_line(line, config))
    return counter


def build_symbols(counter: Counter, config: WordConfig) -> List[tuple]:
    """(symbol, count) in id order: specials first, then by count as the reference."""
    out: List[tuple] = []
    seen = set()
    for s in config.special:
        if s not in seen:
            seen.add(s)
            out.append((s, counter.get(s, 0)))
    for sym, cnt in counter.most_common(config.max_size):
        if cnt < config.min_freq:
            break
        if sym not in seen:
            seen.add(sym)
            out.append((sym, cnt))
    return out


def write_vocab(path: Path, symbols: Sequence[tuple]) -> None:
    """`symbol<TAB>count` lines, written to a temporary name, then renamed."""
    atomic_write_text(path, "".join(f"{sym}\t{cnt}\n" for sym, cnt in symbols))


def read_vocab(path: Path) -> List[str]:
    """The symbols of a vocabulary file in order: the text before the last tab (ours:
    symbol<TAB>count, a symbol may hold a tab or space), else the first whitespace-separated
    field (the reference's vocab files); blank lines are skipped."""
    symbols = []
    try:
        with open(path, "r", encoding="utf-8", newline="") as f:  # only \n ends a line
            text = f.read()
    except OSError as exc:
        raise ConfigError(f"model.tokenizer.vocab_file: cannot read {path} ({exc.strerror})") from None
    for line in text.split("\n"):
        if "\t" in line:
            symbols.append(line.rsplit("\t", 1)[0])
        elif line.strip():
            symbols.append(line.split()[0])
    if not symbols:
        raise ConfigError(f"model.tokenizer.vocab_file: {path} holds no symbols")
    return symbols


def build(config: WordConfig, corpus_files: List[Path], run_dir: Optional[Path]) -> WordTokenizer:
    if config.add_eos and config.add_double_eos:
        raise ConfigError("model.tokenizer.add_double_eos: set add_eos = false with it (a line ends one way)")
    if config.model:
        raise ConfigError("model.tokenizer.model: the word library reads its vocabulary from vocab_file")
    if config.vocab_file:
        path = Path(config.vocab_file).expanduser()
        if not path.is_file():
            raise ConfigError(f"model.tokenizer.vocab_file: no such file {path}")
        return WordTokenizer(read_vocab(path), config, path)
    if run_dir is None:
        raise ConfigError("model.tokenizer.vocab_file: not set, and there is no run directory to count a vocabulary into")
    files = [Path(f) for f in corpus_files]
    path = Path(run_dir) / VOCAB_NAME
    if not files and not path.is_file():  # with none, the run's counted vocabulary is used as it is
        raise ConfigError("model.tokenizer: the word library counts its vocabulary from the data files, and there are none")
    options = {k: getattr(config, k) for k in ("special", "lower_case", "delimiter", "min_freq", "max_size")}
    stamp = trained_files.stamp(files, options)
    if not trained_files.reusable(path, stamp, "the word vocabulary"):
        total = sum(f.stat().st_size for f in files)
        log.info("counting a word vocabulary over %.1f MB of text", total / 1e6)
        counter = count_words(files, config)
        symbols = build_symbols(counter, config)
        if len(symbols) == len(config.special) and not counter:
            raise DataError(f"cannot build a word vocabulary: no words in {', '.join(map(str, files))}")
        path.parent.mkdir(parents=True, exist_ok=True)
        write_vocab(path, symbols)
        trained_files.write_stamp(path, stamp)
        log.info("word vocabulary: %d symbols from %d distinct words", len(symbols), len(counter))
    return WordTokenizer(read_vocab(path), config, path)


@mega.hookimpl
def register_tokenizers(register):
    register("word", build, config=WordConfig)
