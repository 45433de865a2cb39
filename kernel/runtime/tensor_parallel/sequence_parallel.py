"""Sequence parallelism (Megatron's `sequence_parallel`, Korthikanti et al. 2022): with
tensor parallelism, the parts of a transformer layer TP leaves replicated on every rank
(LayerNorms, residual dropouts and adds, the embedding dropout) work on this rank's slice of
the sequence instead, [batch, seq / TP, hidden]. A column-parallel linear all-gathers its
input along the sequence (backward: reduce-scatter), a row-parallel linear reduce-scatters
its output (backward: all-gather); the collectives are in `mappings`.

What lives here:

* the region: a model runs its training forwards inside `sequence_parallel_region()`;
  layers built with `sequence_parallel=True` split the sequence only inside it, so the same
  model serves whole-sequence inference (KV-cache decoding, one token at a time) outside;
* `sequence_parallel_linear`: the gathered input of a column-parallel linear is saved for
  the weight gradient as this rank's slice only, gathered again in backward (Megatron's
  LinearWithGradAccumulationAndAsyncCommunication saves its local input). This is what
  brings the saved LayerNorm outputs to 1/TP; a plain gather + F.linear would keep the whole
  sequence. It runs F.linear itself, so its arithmetic is the one of tensor parallelism
  without SP;
* `sum_sequence_parallel_grads`: parameters tagged `sequence_parallel = True` (LayerNorm
  weights and biases, row-parallel biases) see only this rank's tokens, so their gradients
  are summed over the tensor-parallel group after the data-parallel reduction (Megatron's
  `_allreduce_non_tensor_model_parallel_grads`).
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Iterable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from mega.runtime import recompute
from mega.runtime.parallel import current
from mega.runtime.tensor_parallel.mappings import SEQ_DIM, _gather_seq, gather_from_sp

_REGION = [False]


def sequence_parallel_state() -> bool:
    """Whether the code now running is inside the region (set or not, whatever the TP size)."""
    return _REGION[0]


@contextlib.contextmanager
def sequence_parallel_region(on: bool = True):
    """Layers built for sequence parallelism split the sequence inside this block."""
    before = _REGION[0]
    _REGION[0] = bool(on)
    try:
        yield
    finally:
        _REGION[0] = before


def sequence_parallel_active(built_for_it: bool = True) -> bool:
    """A layer built with `sequence_parallel=built_for_it` splits the sequence now."""
    return built_for_it and _REGION[0] and current().tp_size > 1


class _LocalInput:
    """What the saving linear keeps in place of the gathered input: this rank's slice."""

    __slots__ = ("local", "shape")

    def __init__(self, local: torch.Tensor, shape: torch.Size):
        self.local, self.shape = local, shape


def sequence_parallel_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """F.linear of the whole sequence gathered from this rank's slice `x` [b, s/TP, in]:
    [b, s, out / TP]. The input gradient is reduce-scattered back to [b, s/TP, in]; the
    saved input is this rank's slice (module docstring)."""
    total = gather_from_sp(x)
    if not torch.is_grad_enabled() or recompute.in_checkpoint():
        return F.linear(total, weight, bias)
    device = x.device.type
    local = x.detach()
    if torch.is_autocast_enabled(device) and x.is_floating_point():
        dtype = torch.get_autocast_dtype(device)  # the cast F.linear would make under autocast, made here
        total = total.to(dtype)
        local = local.to(dtype)

    whole = weakref.ref(total)  # autograd keeps the hooks with what they saved: not the gathered input

    def pack(t: torch.Tensor):
        gathered = whole()
        if gathered is not None and (t is gathered or t._base is gathered):
            return _LocalInput(local, t.shape)
        return t

    def unpack(saved):
        if isinstance(saved, _LocalInput):
            return _gather_seq(saved.local).reshape(saved.shape)
        return saved

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        return F.linear(total, weight, bias)


def tag_sequence_parallel(module: torch.nn.Module) -> torch.nn.Module:
    """Mark every parameter of `module` (a LayerNorm) as seeing only this rank's tokens."""
    for p in module.parameters():
        p.sequence_parallel = True
    return module


def sum_sequence_parallel_grads(params: Iterable[torch.nn.Parameter], parallel=None) -> None:
    """Sum over the tensor-parallel group the gradients of the parameters tagged
    `sequence_parallel` (each rank's holds its tokens' part), in one flat all-reduce.
    `params`: the tensors the optimizer steps, whose `.grad` is final (the fp32 main weights
    under model.megatron_amp_O2). Every rank of the group holds the same tagged parameters."""
    st = parallel or current()
    if st.tp_size == 1:
        return
    grads = [p.grad for p in params if getattr(p, "sequence_parallel", False) and p.grad is not None]
    if not grads:
        return
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat, group=st.tp_group)
    for g, summed in zip(grads, _unflatten_dense_tensors(flat, grads)):
        g.copy_(summed)


__all__ = ["SEQ_DIM", "sequence_parallel_region", "sequence_parallel_state", "sequence_parallel_active",
           "sequence_parallel_linear", "tag_sequence_parallel", "sum_sequence_parallel_grads"]
