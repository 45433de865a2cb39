"""Document packing for next-token samples (Megatron-LM's GPTDataset, in spirit).

The documents of a split (their ids already end with the end-of-document id) are
concatenated into one stream per epoch and cut into windows of seq_length + 1 tokens that
overlap by one token (the last label of a window is the first token of the next), so no
position is padding and no text is dropped. Each epoch uses every token of the split once:
its last window is the only one that may be short, and it is padded with the loss masked.

Determinism: epoch e orders the documents by a permutation seeded with (seed, e, 0) and the
windows by one seeded with (seed, e, 1) (Megatron's document, sample and shuffle indices),
so sample k is a pure function of (k, seed) and a resumed run sees the same samples. Both
orders are O(documents + samples) numpy work per epoch, computed when first needed; the
expensive part, tokenizing, is done once before (the indexed files, or text_mmap's cache).
"""
from __future__ import annotations

from typing import Dict, Tuple

import numpy as np
import torch

from mega.errors import ConfigError


class DocumentSpan:
    """Documents [start, end) of a token store (an IndexedDataset: `sequence_lengths`,
    `get(i, offset, length)`), one sequence per document."""

    def __init__(self, store, start: int, end: int):
        self.store, self.start, self.end = store, start, end
        self.lengths = np.asarray(store.sequence_lengths[start:end], dtype=np.int64)

    def __len__(self) -> int:
        return self.end - self.start

    def get(self, i: int, offset: int, length: int) -> np.ndarray:
        return self.store.get(self.start + i, offset, length)


class PackedSamples:
    """Epoch-aware packed samples: index k >= len() continues into later epochs."""

    shuffles_epochs = True  # BlendedDataset must not wrap it in another epoch shuffle

    def __init__(self, docs: DocumentSpan, seq_length: int, pad_id: int, seed: int, shuffle: bool = True,
                 name: str = "data"):
        self.docs, self.seq_length, self.pad_id, self.seed, self.shuffle = docs, seq_length, pad_id, seed, shuffle
        self.total_tokens = int(docs.lengths.sum())
        if self.total_tokens < 2:
            raise ConfigError(f"model.data: {name} has {self.total_tokens} tokens; packing needs at least 2")
        self.samples_per_epoch = -(-(self.total_tokens - 1) // seq_length)  # ceil: the last window may be short
        self._cache: dict = {}

    def __len__(self) -> int:
        return self.samples_per_epoch

    def _epoch(self, epoch: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(document order, stream offset where each ordered document starts, sample order),
        kept for the last two epochs asked (per dataset: blended sources alternate)."""
        cached = self._cache.get(epoch)
        if cached is None:
            cached = self._cache[epoch] = self._build_epoch(epoch)
            for old in sorted(self._cache)[:-2]:
                self._cache.pop(old, None)
        return cached

    def _build_epoch(self, epoch: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        n_docs = len(self.docs)
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch, 0]).permutation(n_docs)
            samples = np.random.default_rng([self.seed, epoch, 1]).permutation(self.samples_per_epoch)
        else:
            order, samples = np.arange(n_docs), np.arange(self.samples_per_epoch)
        starts = np.zeros(n_docs + 1, dtype=np.int64)
        np.cumsum(self.docs.lengths[order], out=starts[1:])
        return order, starts, samples

    def window(self, k: int) -> np.ndarray:
        """The ids of sample k: up to seq_length + 1 consecutive tokens of its epoch's stream."""
        epoch, j = divmod(int(k), self.samples_per_epoch)
        order, starts, samples = self._epoch(epoch)
        begin = int(samples[j]) * self.seq_length
        end = min(begin + self.seq_length + 1, self.total_tokens)
        d = int(np.searchsorted(starts, begin, side="right")) - 1
        pieces, pos = [], begin
        while pos < end:
            doc_end = int(starts[d + 1])
            if doc_end > pos:  # empty documents take no room
                take = min(doc_end, end) - pos
                pieces.append(self.docs.get(int(order[d]), pos - int(starts[d]), take))
                pos += take
            d += 1
        return np.concatenate(pieces) if len(pieces) > 1 else np.array(pieces[0])

    def __getitem__(self, k: int) -> Dict[str, torch.Tensor]:
        if k < 0:
            raise IndexError(k)
        return window_sample(self.window(k), self.seq_length, self.pad_id)


def window_sample(ids: np.ndarray, seq_length: int, pad_id: int) -> Dict[str, torch.Tensor]:
    """(tokens, labels, loss_mask) of a window of at most seq_length + 1 ids; a short window
    is right-padded with its padding out of the loss."""
    ids = torch.from_numpy(np.asarray(ids, dtype=np.int64))
    n = len(ids) - 1
    if n == seq_length:
        return {"tokens": ids[:-1].clone(), "labels": ids[1:].clone(), "loss_mask": torch.ones(seq_length)}
    tokens = torch.full((seq_length,), pad_id, dtype=torch.long)
    labels = torch.full((seq_length,), pad_id, dtype=torch.long)
    mask = torch.zeros(seq_length, dtype=torch.float32)
    tokens[:n], labels[:n], mask[:n] = ids[:-1], ids[1:], 1.0
    return {"tokens": tokens, "labels": labels, "loss_mask": mask}
