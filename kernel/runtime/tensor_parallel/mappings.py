"""The autograd-aware communication of tensor parallelism (Megatron's mappings).

    copy_to_tp       forward: identity          backward: all-reduce
    reduce_from_tp   forward: all-reduce        backward: identity
    scatter_to_tp    forward: keep my slice of the last dim   backward: all-gather
    gather_from_tp   forward: all-gather the last dim         backward: keep my slice

A column-parallel layer starts with copy_to_tp (its input is replicated, its input
gradient is a sum over ranks); a row-parallel layer ends with reduce_from_tp.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from mega.runtime.parallel import current


def _all_reduce(x: torch.Tensor) -> torch.Tensor:
    state = current()
    if state.tp_size == 1:
        return x
    x = x.contiguous()
    dist.all_reduce(x, group=state.tp_group)
    return x


def _split_last(x: torch.Tensor) -> torch.Tensor:
    state = current()
    if state.tp_size == 1:
        return x
    return x.chunk(state.tp_size, dim=-1)[state.tp_rank].contiguous()


def _gather_last(x: torch.Tensor) -> torch.Tensor:
    state = current()
    if state.tp_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(state.tp_size)]
    dist.all_gather(parts, x.contiguous(), group=state.tp_group)
    return torch.cat(parts, dim=-1)


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, g):
        return _all_reduce(g.clone())


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _all_reduce(x.clone())

    @staticmethod
    def backward(ctx, g):
        return g


class _ScatterToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _split_last(x)

    @staticmethod
    def backward(ctx, g):
        return _gather_last(g)


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _gather_last(x)

    @staticmethod
    def backward(ctx, g):
        return _split_last(g)


def copy_to_tp(x):
    return _CopyToTP.apply(x) if current().tp_size > 1 else x


def reduce_from_tp(x):
    return _ReduceFromTP.apply(x) if current().tp_size > 1 else x


def scatter_to_tp(x):
    return _ScatterToTP.apply(x) if current().tp_size > 1 else x


def gather_from_tp(x):
    return _GatherFromTP.apply(x) if current().tp_size > 1 else x
