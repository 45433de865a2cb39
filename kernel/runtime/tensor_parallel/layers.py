"""Megatron-style tensor-parallel layers.

Each layer initialises its *full* (master) weight with the given init method and keeps
its own slice, so a model built at any tensor-parallel size starts from exactly the
weights of the single-process model with the same seed. Every parameter carries
`partition_dim`: the dimension split across tensor-parallel ranks (None: replicated),
which the grad-norm and checkpoint resharding code read.

Built with `sequence_parallel=True`, a column-parallel layer takes this rank's slice of the
sequence and gathers it, and a row-parallel layer reduce-scatters its output to such a
slice (its bias, added after, then sees only this rank's tokens: tagged
`sequence_parallel`), inside the sequence-parallel region only (`sequence_parallel.py`).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from mega.runtime.parallel import current
from mega.runtime.sharding import split_for_rank
from mega.runtime.tensor_parallel.mappings import copy_to_tp, gather_from_tp, reduce_from_tp, reduce_scatter_to_sp
from mega.runtime.tensor_parallel.sequence_parallel import sequence_parallel_active, sequence_parallel_linear

InitMethod = Callable[[torch.Tensor], torch.Tensor]


def shard(master: torch.Tensor, dim: Optional[int], chunks: int = 1) -> nn.Parameter:
    """This rank's slice of `master` along `dim` as a Parameter tagged with partition_dim.
    With `chunks` > 1, `master` is that many equal blocks along `dim` (a gated MLP's
    `[gate; up]`) and the rank holds its slice of each, in order (`partition_chunks`)."""
    state = current()
    p = nn.Parameter(split_for_rank(master, dim, state.tp_size, state.tp_rank, chunks).clone())
    p.partition_dim = dim
    if chunks != 1:
        p.partition_chunks = chunks
    return p


def mark_replicated(module: nn.Module) -> nn.Module:
    """Tag every parameter not created by a parallel layer (norms, position embeddings)
    as replicated, so each one says how it is split."""
    for p in module.parameters():
        if not hasattr(p, "partition_dim"):
            p.partition_dim = None
    return module


def _divide(n: int, what: str) -> int:
    tp = current().tp_size
    if n % tp:
        raise ValueError(f"{what}={n} is not divisible by the tensor-parallel size {tp}")
    return n // tp


class ColumnParallelLinear(nn.Module):
    """y = x A^T + b with A split by output rows: each rank computes its slice of y."""

    def __init__(self, in_features: int, out_features: int, init_method: InitMethod, bias: bool = True,
                 gather_output: bool = False, sequence_parallel: bool = False, chunks: int = 1):
        """`chunks`: the output rows are that many equal blocks, each split over the ranks
        (a gated MLP's fc1 `[gate; up]`: rank r computes `[gate_r; up_r]`)."""
        super().__init__()
        _divide(out_features // chunks, "output features per block" if chunks > 1 else "output features")
        self.gather_output = gather_output
        self.sequence_parallel = sequence_parallel  # its input is the sequence-split stream
        self.weight = shard(init_method(torch.empty(out_features, in_features)), 0, chunks)
        self.bias = shard(torch.zeros(out_features), 0, chunks) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if sequence_parallel_active(self.sequence_parallel):
            y = sequence_parallel_linear(x, self.weight, self.bias)
        else:
            y = F.linear(copy_to_tp(x), self.weight, self.bias)
        return gather_from_tp(y) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """y = x A^T + b with A split by input columns: each rank holds a slice of x (the
    output of a column-parallel layer), partial products are summed across ranks."""

    def __init__(self, in_features: int, out_features: int, init_method: InitMethod, bias: bool = True,
                 sequence_parallel: bool = False):
        super().__init__()
        _divide(in_features, "input features")
        self.sequence_parallel = sequence_parallel  # its output is the sequence-split stream
        self.weight = shard(init_method(torch.empty(out_features, in_features)), 1)
        self.bias = shard(torch.zeros(out_features), None) if bias else None
        if self.bias is not None and sequence_parallel:
            self.bias.sequence_parallel = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        y = reduce_scatter_to_sp(y) if sequence_parallel_active(self.sequence_parallel) else reduce_from_tp(y)
        return y + self.bias if self.bias is not None else y


class VocabParallelEmbedding(nn.Module):
    """An embedding whose rows (the vocabulary) are split across ranks; each rank looks up
    the ids in its range and the partial results are summed."""

    def __init__(self, num_embeddings: int, embedding_dim: int, init_method: InitMethod):
        super().__init__()
        per_rank = _divide(num_embeddings, "padded vocabulary size")
        self.vocab_start = current().tp_rank * per_rank
        self.vocab_end = self.vocab_start + per_rank
        self.weight = shard(init_method(torch.empty(num_embeddings, embedding_dim)), 0)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if current().tp_size == 1:
            return F.embedding(ids, self.weight)
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local = (ids - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tp(out)
