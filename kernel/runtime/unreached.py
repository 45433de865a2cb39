"""Gradients of the parameters a training step did not reach, dropped before the update.

A model that declares `mega.protocols.SparselyReached` (Transformer-XL: adaptive buckets
no token of the step falls in) gives such parameters zero gradients so that DDP and the
fp32 gradient buffer of model.megatron_amp_O2 see every parameter. Left in place, a zero
gradient still moves a tensor through the optimizer's momentum (Adam, LAMB) and decay.
NVIDIA's Transformer-XL sets every `.grad` to None before a step, so an unreached tensor
keeps None there and its optimizer skips it: weights and moments stay as they were. Here
the reached flags are summed over the data-parallel ranks (a tensor one replica reached
gets the averaged gradient on every replica, as DDP gives it) and the gradients of the
tensors no rank reached are set to None.
"""
from __future__ import annotations

from typing import List

import torch

from mega.protocols import SparselyReached


def unreached_parameters(model: torch.nn.Module, parallel, device: torch.device) -> List[torch.nn.Parameter]:
    """The parameters of `model` (as it holds them now) that the forwards since the last
    call reached on no data-parallel rank; [] for a model that does not declare any."""
    if not isinstance(model, SparselyReached):
        return []
    params = model.sparse_parameters()
    reached = model.take_reached()
    if len(reached) != len(params):
        raise RuntimeError(f"{type(model).__name__}.take_reached() gave {len(reached)} flags for"
                           f" {len(params)} sparse_parameters()")
    if not params:
        return []
    # flags are Python bools or device booleans (set without reading the data): one read, here
    flags = torch.stack([torch.as_tensor(r, device=device).to(torch.float32).reshape(()) for r in reached])
    counts = parallel.all_reduce_sum(flags)
    return [p for p, n in zip(params, counts.tolist()) if n == 0]


def drop_gradients(params: List[torch.nn.Parameter], unreached: List[torch.nn.Parameter]) -> List[torch.nn.Parameter]:
    """`params` without `unreached`, whose gradients are set to None."""
    gone = {id(p) for p in unreached}
    for p in unreached:
        p.grad = None
    return [p for p in params if id(p) not in gone]
