"""The `lm_ordered` data source: a split as one token stream read in order, the way
NVIDIA's Transformer-XL reads it (`LMOrderedIterator`), so a model with memory sees each
stream's text continue from one step to the next.

Each line of the split's text becomes its tokens plus end-of-line (`add_eos`, the
reference's `<eos>` per line, empty lines included); a tokenizer with its own line rule
(the `word` tokenizer's `encode_line` / `encode_file`: add_eos, add_double_eos) applies it. The stream is cut into `streams`
contiguous rows (the global batch size; the tail that does not fill a row is dropped) and
each row into segments of seq_length tokens, the last one shorter when the row does not
divide evenly (the reference's iterator yields it; `drop_last` leaves it out, for fixed
shapes). Sample `i` is

    stream = i % streams,  segment = i // streams  (mod the segments per row: epochs)

and the kernel gives step s the samples [s * G, (s + 1) * G) (`mega.training.batches`),
each data-parallel rank a contiguous slice and each micro-batch a contiguous piece of it:
so micro-batch slot m of rank r always reads the same streams (r * G/dp + m * mb, ...),
segment s at step s — the reference's `data.chunk(world_size, dim=1)[rank]` split into
`batch_chunk`s. With `roll`, every epoch rotates each row by a seeded random shift (the
reference's `--roll`).

Files: `data_dir` holding the reference's `train.txt`, `valid.txt`, `test.txt` (WikiText's
`wiki.{split}.tokens` are accepted too), or one file in `data_prefix` (empty: Python's
pydoc topics) cut into splits by lines with `splits_string`. Encoded streams are cached
as .npy files in the run directory, keyed by the file (path, size, modification time), the
split and the tokenizer (its files' contents). A word vocabulary is counted over `files()`:
data_dir's train file (WT103's rule) or the splits `vocab_splits` names (enwik8, text8:
train, valid and test, as the reference counts them), or data_prefix's whole file.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Dict, List, Optional

import attrs
import numpy as np
import torch
from attrs import define

import mega
from mega.config import DataConfig, key
from mega.errors import ConfigError, DataError
from mega.plugins.data.blending import parse_splits, split_ranges
from mega.plugins.data.quickstart_corpus import write_pydoc_corpus
from mega.plugins.data.token_cache import tokenizer_fingerprint
from mega.protocols import SampleObjective
from mega.checkpoint.atomic import atomic_path

log = logging.getLogger("mega.data")
SPLITS = ("train", "valid", "test")


@attrs.frozen
class OrderedLMObjective(SampleObjective):
    """Next-token samples read as `streams` ordered streams (a model with memory declares it;
    `streams` is its global batch size). Data sources that only know "lm" still serve it."""

    name: str = "lm"
    streams: Optional[int] = None


@define(kw_only=True)
class LMOrderedConfig(DataConfig):
    data_impl: str = "lm_ordered"
    data_dir: Optional[str] = key(None,
            help="folder with train.txt, valid.txt, test.txt (or wiki.*.tokens); else data_prefix")
    add_eos: Optional[bool] = key(None,
            help="end-of-line token after every line; None: the tokenizer's rule (word: its add_eos), else true")
    roll: bool = key(False, help="rotate each stream by a seeded random shift every epoch (the reference's --roll)")
    streams: Optional[int] = key(None, help="rows the stream is cut into; None: the model's global_batch_size")
    drop_last: bool = key(False,
            help="leave out each stream's last, shorter segment (false: keep it, as the reference does)")
    vocab_splits: Optional[List[str]] = key(None,
            help="data_dir's splits a counted vocabulary comes from, in order; None: [\"train\"] (WT103); enwik8, text8: [\"train\", \"valid\", \"test\"]")


class LMOrderedSamples:
    """Sample i = (stream i % streams, segment i // streams) of one split's token stream."""

    def __init__(self, stream: torch.Tensor, streams: int, seq_length: int, num_samples: int, seed: int,
                 roll: bool = False, split: str = "train", drop_last: bool = False):
        self.stream, self.streams, self.seq_length, self.num_samples = stream, streams, seq_length, num_samples
        self.seed, self.roll = seed, roll
        self.n_step = stream.numel() // streams
        self.rows = stream[: self.n_step * streams].view(streams, self.n_step)
        # segments per row (inputs + next token); the last may be shorter, as the reference's
        # range(0, n_step - 1, tgt_len) with seq_len = min(tgt_len, n_step - 1 - i)
        if drop_last:
            self.segments = (self.n_step - 1) // seq_length
            need = f"{streams} x ({seq_length} + 1)"
        else:
            self.segments = -(-(self.n_step - 1) // seq_length) if self.n_step > 1 else 0
            need = f"{streams} x 2"
        if self.segments < 1:
            raise ConfigError(f"model.seq_length={seq_length}, model.global_batch_size={streams}: the {split} split has"
                              f" {stream.numel()} tokens, fewer than {need}; use fewer streams,"
                              " shorter segments or more text")
        self._shifts: Dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.num_samples

    def position(self, i: int) -> tuple:
        """(stream, epoch, segment) of sample i."""
        step = i // self.streams
        return i % self.streams, step // self.segments, step % self.segments

    def _shift(self, epoch: int, row: int) -> int:
        if not self.roll:
            return 0
        if epoch not in self._shifts:
            self._shifts = {epoch: np.random.default_rng([self.seed, epoch]).integers(0, self.n_step, self.streams)}
        return int(self._shifts[epoch][row])

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        if not 0 <= i < self.num_samples:
            raise IndexError(i)
        row, epoch, seg = self.position(i)
        start = seg * self.seq_length
        length = min(self.seq_length, self.n_step - 1 - start)
        idx = torch.arange(start, start + length + 1)
        shift = self._shift(epoch, row)
        if shift:  # torch.roll(row, shift)[k] == row[(k - shift) % n]
            idx = (idx - shift) % self.n_step
        ids = self.rows[row, idx]
        return {"tokens": ids[:-1].clone(), "labels": ids[1:].clone(),
                "loss_mask": torch.ones(length, dtype=torch.float32),
                "stream": torch.tensor(row, dtype=torch.long)}


def _file_lines(path: Path) -> List[str]:
    """The lines of a file as iterating over it gives them (split at "\\n" only, unlike
    str.splitlines), without the line breaks."""
    lines = path.read_text(encoding="utf-8").split("\n")
    return lines[:-1] if lines and lines[-1] == "" else lines


def _vocab_splits(splits: Optional[List[str]]) -> List[str]:
    """The splits to count a vocabulary over, checked: the reference counts WT103's train
    file only and enwik8's, text8's, PTB's and WT2's train, valid and test files."""
    if splits is None:
        return ["train"]
    if not splits or any(s not in SPLITS for s in splits) or len(set(splits)) != len(splits):
        raise ConfigError(f"model.data.vocab_splits={list(splits)}: a list of distinct splits out of {list(SPLITS)}")
    return list(splits)


class LMOrderedSource:
    def __init__(self, config: LMOrderedConfig, run_dir: Optional[Path]):
        self.config, self.run_dir = config, Path(run_dir) if run_dir is not None else None
        self.split_files: Dict[str, Path] = {}
        if config.data_dir:
            root = Path(config.data_dir).expanduser()
            for split in SPLITS:
                candidates = [root / f"{split}.txt", root / f"wiki.{split}.tokens"]
                found = next((p for p in candidates if p.is_file()), None)
                if found is None:
                    raise DataError(f"model.data.data_dir={config.data_dir}: no {candidates[0].name} (or {candidates[1].name})")
                self.split_files[split] = found
            self.paths = [self.split_files[s] for s in _vocab_splits(config.vocab_splits)]
            self.fractions = None
        else:
            if config.vocab_splits is not None:
                raise ConfigError(f"model.data.vocab_splits={config.vocab_splits}: applies to data_dir's split files;"
                                  " data_prefix's one file is counted whole (every split's lines)")
            prefix = list(config.data_prefix)
            if not prefix:
                if run_dir is None:
                    raise ConfigError("model.data.data_prefix: empty, and there is no run directory for the quickstart corpus")
                prefix = [str(write_pydoc_corpus(Path(run_dir) / "data" / "pydoc_topics.txt"))]
            paths = [p for p in prefix if not isinstance(p, (int, float))]
            if len(paths) != 1:
                raise ConfigError(f"model.data.data_prefix={config.data_prefix}: lm_ordered reads one file (or use data_dir)")
            self.paths = [Path(paths[0]).expanduser()]
            if not self.paths[0].is_file():
                raise DataError(f"{self.paths[0]}: no such data file")
            self.fractions = parse_splits(config.splits_string)

    def files(self) -> List[Path]:
        """What a word vocabulary is counted over: data_dir's `vocab_splits` files, or the
        one data_prefix file (all its splits)."""
        return list(self.paths)

    def _lines(self, split: str) -> List[str]:
        if self.fractions is None:
            return _file_lines(self.split_files[split])
        lines = _file_lines(self.paths[0])
        start, end = split_ranges(len(lines), self.fractions)[SPLITS.index(split)]
        return lines[start:end]

    def token_stream(self, split: str, tokenizer) -> torch.Tensor:
        """The whole split as one 1-D LongTensor (cached in the run directory)."""
        source = self.split_files.get(split, self.paths[0])
        st = source.stat()
        # the tokenizer by its files' contents, not their paths: a vocabulary counted again
        # into the same run directory must not meet the stream encoded with the old one
        key = hashlib.sha256(repr((str(source.resolve()), st.st_size, st.st_mtime_ns, split, self.config.splits_string,
                                   self.config.add_eos, tokenizer_fingerprint(tokenizer))).encode()).hexdigest()[:16]
        cache = self.run_dir / "data" / f"lm_ordered.{split}.{key}.npy" if self.run_dir is not None else None
        if cache is not None and cache.is_file():
            return torch.from_numpy(np.load(cache).astype(np.int64))
        own_rule = self.config.add_eos is None and hasattr(tokenizer, "encode_line")
        dtype = np.int32 if tokenizer.vocab_size < 2**31 else np.int64
        if own_rule and self.fractions is None and hasattr(tokenizer, "encode_file"):
            arr = np.asarray(tokenizer.encode_file(source), dtype=dtype)  # the whole file, the tokenizer's fast path
        else:
            ids: List[int] = []
            eos = [tokenizer.eos_id] if self.config.add_eos in (None, True) else []
            for line in self._lines(split):
                if own_rule:
                    ids.extend(tokenizer.encode_line(line))
                else:
                    ids.extend(tokenizer.encode(line))
                    ids.extend(eos)
            arr = np.asarray(ids, dtype=dtype)
        if cache is not None:
            try:
                cache.parent.mkdir(parents=True, exist_ok=True)
                with atomic_path(cache, suffix=".npy") as tmp:
                    np.save(tmp, arr)
            except OSError as exc:
                log.warning("could not cache the %s token stream at %s: %s", split, cache, exc)
        return torch.from_numpy(arr.astype(np.int64))

    def dataset(self, split: str, tokenizer, seq_length: int, num_samples: int, seed: int,
                objective: SampleObjective = SampleObjective()) -> LMOrderedSamples:
        if objective.name != "lm":
            raise ConfigError(f"model.name: lm_ordered has no samples for the objective {objective.name!r} (lm)")
        streams = self.config.streams or getattr(objective, "streams", None)
        if not streams:
            raise ConfigError("model.data.streams: lm_ordered needs the number of streams (or a model that declares"
                              " it, e.g. transformer_xl with model.global_batch_size)")
        stream = self.token_stream(split, tokenizer)
        return LMOrderedSamples(stream, streams, seq_length, num_samples, seed + 7919 * SPLITS.index(split),
                                self.config.roll and split == "train", split, self.config.drop_last)


@mega.hookimpl
def register_datasets(register):
    register("lm_ordered", LMOrderedSource, config=LMOrderedConfig)
