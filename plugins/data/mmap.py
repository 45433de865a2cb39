"""The `mmap` dataset: Megatron-LM's pre-tokenized indexed files (`PREFIX.bin`/`.idx`).

`model.data.data_prefix` names the prefixes, as Megatron-LM's `--data-path` does: one
prefix, a list of them (equal weights), or `[weight, prefix, weight, prefix, ...]`. The
files come from `mega preprocess` or Megatron-LM's `tools/preprocess_data.py` (use
`--append-eod`, so documents end with an end-of-document id: the ids are read as written).
The ids must be the run's tokenizer's: `model.tokenizer` names the tokenizer that made them.

Documents are split by `splits_string` and, for language models, packed into
seq_length + 1 windows (`mega.plugins.data.packing`); with `pack = false` each document is
one sample, truncated and padded.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import numpy as np
from attrs import define

import mega
from mega.config import DataConfig, key
from mega.errors import ConfigError
from mega.plugins.data.blending import BlendedDataset, parse_splits, split_ranges
from mega.plugins.data.indexed import IndexedDataset, IndexedDatasetWriter, optimal_dtype
from mega.plugins.data.packing import DocumentSpan, PackedSamples, window_sample
from mega.protocols import SampleObjective

SPLITS = {"train": 0, "valid": 1, "test": 2}


@define(kw_only=True)
class MMapConfig(DataConfig):
    data_impl: str = "mmap"
    shuffle: bool = key(True, help="shuffle documents and samples each epoch (seeded by model.seed)")
    pack: bool = key(True, help="concatenate documents into full windows; false: one padded sample per document")


class DocumentSamples:
    """One sample per document (pack = false): its first seq_length + 1 ids, padded."""

    def __init__(self, docs: DocumentSpan, seq_length: int, pad_id: int):
        self.docs, self.seq_length, self.pad_id = docs, seq_length, pad_id
        self.nonempty = np.flatnonzero(docs.lengths >= 2)

    def __len__(self) -> int:
        return len(self.nonempty)

    def __getitem__(self, i: int):
        d = int(self.nonempty[i])
        n = min(int(self.docs.lengths[d]), self.seq_length + 1)
        return window_sample(self.docs.get(d, 0, n), self.seq_length, self.pad_id)


class MMapSource:
    """The indexed files of `data_prefix`, ready to be split, packed and blended."""

    def __init__(self, config: MMapConfig, run_dir: Optional[Path]):
        self.config = config
        prefix = list(config.data_prefix)
        if not prefix:
            raise ConfigError("model.data.data_prefix: data_impl = \"mmap\" needs the PREFIX of PREFIX.bin/.idx files"
                              " (make them with `mega preprocess`)")
        self.weights = [float(w) for w in prefix[::2]]
        self.prefixes = [str(Path(str(p)).expanduser()) for p in prefix[1::2]]
        self.datasets = [IndexedDataset(p) for p in self.prefixes]
        self.fractions = parse_splits(config.splits_string)

    def files(self) -> List[Path]:
        return []  # token ids, no text a tokenizer could train on

    def dataset(self, split: str, tokenizer, seq_length: int, num_samples: int, seed: int,
                objective: SampleObjective = SampleObjective()):
        if objective.name != "lm":
            raise ConfigError(f"model.name: the mmap dataset has no samples for the objective {objective.name!r} (lm)")
        parts, weights = [], []
        for w, prefix, ds in zip(self.weights, self.prefixes, self.datasets):
            first, last = split_ranges(ds.num_documents, self.fractions)[SPLITS[split]]
            start, end = int(ds.document_indices[first]), int(ds.document_indices[last]) if ds.num_documents else 0
            if end <= start:
                continue
            docs = DocumentSpan(ds, start, end)
            if self.config.pack:
                parts.append(PackedSamples(docs, seq_length, tokenizer.pad_id, seed + 101 * SPLITS[split] + 7919 * len(parts),
                                           shuffle=self.config.shuffle, name=f"the {split} split of {prefix}"))
            elif (docs.lengths >= 2).any():
                parts.append(DocumentSamples(docs, seq_length, tokenizer.pad_id))
            else:
                continue
            weights.append(w)
        if not parts:
            raise ConfigError(
                f"model.data.splits_string: the {split} split of {', '.join(self.prefixes)} has no documents"
                f" ({self.config.splits_string!r}); give it a share or more data")
        return BlendedDataset(parts, weights, num_samples, seed + 101 * SPLITS[split], shuffle=self.config.shuffle)

    @staticmethod
    def document_writer(prefix: Path, vocab_size: int) -> IndexedDatasetWriter:
        """For `mega preprocess`: the files `data_prefix = PREFIX` reads, ids in Megatron's dtype."""
        return IndexedDatasetWriter(prefix, optimal_dtype(vocab_size))


@mega.hookimpl
def register_datasets(register):
    register("mmap", MMapSource, config=MMapConfig)
