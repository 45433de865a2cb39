"""Splits, epoch shuffling and weighted blending of datasets (Megatron's data_prefix).

Everything is a pure function of (seed, index), so a resumed run that starts at sample k
sees exactly the samples an uninterrupted run would.
"""
from __future__ import annotations

import functools
from typing import List, Sequence, Tuple

import numpy as np

from mega.errors import ConfigError


def parse_splits(splits_string: str) -> List[float]:
    """"800,100,100" -> [0.8, 0.1, 0.1] (missing parts are 0; "/" also separates)."""
    text = splits_string.strip().strip("\"'")
    try:
        parts = [float(p) for p in text.replace("/", ",").split(",") if p.strip()]
    except ValueError:
        raise ConfigError(f"model.data.splits_string: expected numbers like \"800,100,100\", got {splits_string!r}") from None
    parts = (parts + [0.0, 0.0, 0.0])[:3]
    if any(p < 0 for p in parts) or sum(parts) <= 0:
        raise ConfigError(f"model.data.splits_string: expected non-negative proportions with a positive sum, got {splits_string!r}")
    total = sum(parts)
    return [p / total for p in parts]


def split_ranges(num_docs: int, fractions: Sequence[float]) -> List[Tuple[int, int]]:
    """Contiguous [start, end) document ranges for train, valid, test."""
    bounds = [0]
    for f in fractions:
        bounds.append(bounds[-1] + int(round(f * num_docs)))
    bounds[-1] = num_docs
    bounds = [min(b, num_docs) for b in bounds]
    return [(bounds[i], bounds[i + 1]) for i in range(3)]


class EpochShuffled:
    """Index k -> sample perm_epoch[k % n] of `dataset`, a fresh permutation per epoch."""

    def __init__(self, dataset, seed: int, shuffle: bool = True):
        self.dataset, self.seed, self.shuffle = dataset, seed, shuffle
        self.n = len(dataset)

    @functools.lru_cache(maxsize=4)
    def _perm(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def __getitem__(self, k: int):
        epoch, i = divmod(int(k), self.n)
        return self.dataset[int(self._perm(epoch)[i]) if self.shuffle else i]


def blend_order(weights: Sequence[float], num_samples: int) -> Tuple[np.ndarray, np.ndarray]:
    """(dataset index, sample index within it) for each of `num_samples` positions.

    Dataset d's k-th sample is placed at ideal time (k + 0.5) / w_d; sorting those times
    interleaves the datasets so every prefix follows the weights as closely as whole
    samples allow (the result Megatron's greedy blending aims for), vectorised.
    """
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    times, ids, ks = [], [], []
    for d, wd in enumerate(w):
        k = np.arange(int(np.ceil(wd * num_samples)) + 1)
        times.append((k + 0.5) / wd)
        ids.append(np.full(len(k), d))
        ks.append(k)
    order = np.argsort(np.concatenate(times), kind="stable")[:num_samples]
    return np.concatenate(ids)[order], np.concatenate(ks)[order]


class BlendedDataset:
    """`num_samples` samples drawn from `datasets` by `weights`, each epoch-shuffled (a
    dataset with `shuffles_epochs = True` takes indices past its length and orders each
    epoch itself, e.g. packed documents)."""

    def __init__(self, datasets: Sequence, weights: Sequence[float], num_samples: int, seed: int, shuffle: bool = True):
        self.sources = [ds if getattr(ds, "shuffles_epochs", False) else EpochShuffled(ds, seed + 7919 * d, shuffle)
                        for d, ds in enumerate(datasets)]
        self.dataset_ids, self.sample_ids = blend_order(weights, num_samples)
        self.num_samples = num_samples

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int):
        if not 0 <= i < self.num_samples:
            raise IndexError(i)
        return self.sources[int(self.dataset_ids[i])][int(self.sample_ids[i])]
