"""The autograd-aware communication of tensor parallelism (Megatron's mappings).

    copy_to_tp       forward: identity          backward: all-reduce
    reduce_from_tp   forward: all-reduce        backward: identity
    scatter_to_tp    forward: keep my slice of the last dim   backward: all-gather
    gather_from_tp   forward: all-gather the last dim         backward: keep my slice

A column-parallel layer starts with copy_to_tp (its input is replicated, its input
gradient is a sum over ranks); a row-parallel layer ends with reduce_from_tp.

Sequence parallelism (Megatron's `*_sequence_parallel_region`) splits the activations
between those layers along the sequence, mega's dim 1 of [batch, seq, hidden]:

    scatter_to_sp         forward: keep my slice of the sequence   backward: all-gather
    gather_from_sp        forward: all-gather the sequence         backward: reduce-scatter
                          (reduce_grads=False: keep my slice, for consumers whose gradient
                          is already whole on every rank)
    reduce_scatter_to_sp  forward: reduce-scatter the sequence     backward: all-gather

The collectives run on [seq, batch, hidden] copies (the first dimension is what torch's
all_gather_single / reduce_scatter_single split), so rank r holds tokens
[r * s/t, (r+1) * s/t). An all-gather then a reduce-scatter move what one all-reduce
moves; a reduce-scatter of two ranks gives each rank exactly its slice of the all-reduce.
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


# --- sequence parallelism --------------------------------------------------------------------

SEQ_DIM = 1  # mega's activations are [batch, seq, hidden]


def _split_seq(x: torch.Tensor) -> torch.Tensor:
    state = current()
    s = x.shape[SEQ_DIM]
    if s % state.tp_size:
        raise ValueError(f"sequence parallelism: a sequence of {s} tokens does not split over"
                         f" {state.tp_size} tensor-parallel ranks (model.sequence_parallel)")
    return x.chunk(state.tp_size, dim=SEQ_DIM)[state.tp_rank].contiguous()


def _gather_seq(x: torch.Tensor) -> torch.Tensor:
    state = current()
    local = x.transpose(0, SEQ_DIM).contiguous()
    out = torch.empty((local.shape[0] * state.tp_size, *local.shape[1:]), dtype=x.dtype, device=x.device)
    dist.all_gather_single(out, local, group=state.tp_group)
    return out.transpose(0, SEQ_DIM).contiguous()


def _reduce_scatter_seq(x: torch.Tensor) -> torch.Tensor:
    state = current()
    full = x.transpose(0, SEQ_DIM).contiguous()
    if full.shape[0] % state.tp_size:
        raise ValueError(f"sequence parallelism: a sequence of {full.shape[0]} tokens does not split over"
                         f" {state.tp_size} tensor-parallel ranks (model.sequence_parallel)")
    out = torch.empty((full.shape[0] // state.tp_size, *full.shape[1:]), dtype=x.dtype, device=x.device)
    dist.reduce_scatter_single(out, full, group=state.tp_group)
    return out.transpose(0, SEQ_DIM).contiguous()


class _ScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _split_seq(x)

    @staticmethod
    def backward(ctx, g):
        return _gather_seq(g)


class _GatherFromSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, reduce_grads: bool):
        ctx.reduce_grads = reduce_grads
        return _gather_seq(x)

    @staticmethod
    def backward(ctx, g):
        return (_reduce_scatter_seq(g) if ctx.reduce_grads else _split_seq(g)), None


class _ReduceScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _reduce_scatter_seq(x)

    @staticmethod
    def backward(ctx, g):
        return _gather_seq(g)


def scatter_to_sp(x):
    return _ScatterToSP.apply(x) if current().tp_size > 1 else x


def gather_from_sp(x, reduce_grads: bool = True):
    """The whole sequence from every rank's slice. `reduce_grads`: the consumer is a
    tensor-parallel region whose input gradient is partial on each rank (a column-parallel
    linear), so backward reduce-scatters; False: the gradient is already whole everywhere
    (replicated heads), so backward keeps this rank's slice."""
    return _GatherFromSP.apply(x, reduce_grads) if current().tp_size > 1 else x


def reduce_scatter_to_sp(x):
    return _ReduceScatterToSP.apply(x) if current().tp_size > 1 else x
