"""Gradients of the parameters a training step did not reach, dropped before the update.

A model that declares `mega.protocols.SparselyReached` (Transformer-XL: adaptive buckets
no token of the step falls in) gives such parameters zero gradients so that DDP and the
fp32 gradient buffer of model.megatron_amp_O2 see every parameter. Left in place, a zero
gradient still moves a tensor through the optimizer's momentum (Adam, LAMB) and decay.
NVIDIA's Transformer-XL sets every `.grad` to None before a step, so an unreached tensor
keeps None there and its optimizer skips it: weights and moments stay as they were. Here
the reached flags are summed over the data-parallel ranks (a tensor one replica reached
gets the averaged gradient on every replica, as DDP gives it) and the gradients of the
tensors no rank reached are set to None (`drop_gradients`, a host decision: the
distributed optimizer's shards) or, without reading anything on the host, their weights
and optimizer state are put back after the step (`KeepUnreached`).
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


def reached_on_any_rank(model: torch.nn.Module, parallel, device: torch.device):
    """(the sparse parameters of `model`, a device boolean per parameter: reached by the
    forwards since the last call on some data-parallel rank); ([], None) for a model that
    declares none. Nothing is read on the host (see `KeepUnreached`)."""
    if not isinstance(model, SparselyReached):
        return [], None
    params = model.sparse_parameters()
    reached = model.take_reached()
    if len(reached) != len(params):
        raise RuntimeError(f"{type(model).__name__}.take_reached() gave {len(reached)} flags for"
                           f" {len(params)} sparse_parameters()")
    if not params:
        return [], None
    flags = torch.stack([torch.as_tensor(r, device=device).to(torch.float32).reshape(()) for r in reached])
    return params, parallel.all_reduce_sum(flags) > 0


class KeepUnreached:
    """The device-side form of dropping unreached gradients (no host read, so the step can
    be captured in a CUDA graph): the zero gradients stay, the optimizer steps every
    tensor, and each unreached tensor then gets back its weights and optimizer state from
    before the step (`torch.where` on its reached flag). A tensor that had no state before
    gets zeros and step 0, which the next step treats as no state (Adam's and LAMB's
    moments start at zero). The weights and moments equal those of `drop_gradients`; the
    clipping norm counts the zero gradients, which add nothing to it.

    `with KeepUnreached(stepped, reached, optimizer): optimizer.step()`, where `stepped`
    are the tensors the optimizer holds (the fp32 mains under model.megatron_amp_O2), one
    per flag."""

    def __init__(self, stepped: List[torch.Tensor], reached: torch.Tensor, optimizer: torch.optim.Optimizer):
        self.stepped, self.reached, self.optimizer = stepped, reached, optimizer

    def __enter__(self):
        with torch.no_grad():
            self.before = [(p.detach().clone(), {k: v.clone() for k, v in self.optimizer.state.get(p, {}).items()
                                                 if torch.is_tensor(v)}) for p in self.stepped]
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is not None:
            return False
        with torch.no_grad():
            for i, (p, (weight, state)) in enumerate(zip(self.stepped, self.before)):
                hit = self.reached[i]
                p.copy_(torch.where(hit.to(p.device), p, weight))
                for k, v in self.optimizer.state.get(p, {}).items():
                    if torch.is_tensor(v):  # a counter kept on the host (torch's Adam) is read here: one sync
                        old = state[k] if k in state else torch.zeros_like(v)
                        v.copy_(torch.where(hit.to(v.device), v, old))
        return False


def drop_gradients(params: List[torch.nn.Parameter], unreached: List[torch.nn.Parameter]) -> List[torch.nn.Parameter]:
    """`params` without `unreached`, whose gradients are set to None."""
    gone = {id(p) for p in unreached}
    for p in unreached:
        p.grad = None
    return [p for p in params if id(p) not in gone]
