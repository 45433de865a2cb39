"""Global gradient-norm clipping across model-parallel ranks.

Each parameter's squared gradient norm is counted once: tensor-parallel shards
(`partition_dim` set) on every rank, replicated parameters only on tensor-parallel rank 0;
the sum is all-reduced over the tensor- and pipeline-parallel groups. Every rank then
scales by the same coefficient, so replicas stay identical.

`sharded`: the parameters are the distributed optimizer's main shards (each element of the
data-parallel-reduced gradient lives on one data-parallel rank), so the sum is all-reduced
over every rank (data-, tensor- and pipeline-parallel: Megatron's grad_stats_parallel_group
for its DistributedOptimizer), with the same filters on each shard's parameter. The sum
runs in another order than torch's clip_grad_norm_: the norm may differ in its last bits.
"""
from __future__ import annotations

from typing import List

import torch
import torch.distributed as dist


def clip_grad_norm(params: List[torch.nn.Parameter], max_norm: float, state, sharded: bool = False) -> torch.Tensor:
    if state.tp_size == 1 and state.pp_size == 1 and not sharded:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    grads = [p.grad for p in params if p.grad is not None]
    device = grads[0].device if grads else _device(state)
    total = torch.zeros((), device=device, dtype=torch.float32)
    for p in params:
        if p.grad is None:
            continue
        if getattr(p, "partition_dim", None) is None and state.tp_rank != 0:
            continue
        if getattr(p, "shared_embedding_copy", False):  # the last stage's copy of a tied embedding
            continue
        total += p.grad.detach().float().pow(2).sum()
    if sharded:
        if state.world_size > 1:
            dist.all_reduce(total)
    else:
        if state.tp_size > 1:
            dist.all_reduce(total, group=state.tp_group)
        if state.pp_size > 1:
            dist.all_reduce(total, group=state.pp_group)
    norm = total.sqrt()
    if max_norm != float("inf"):
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_(grads, coef)
    return norm


def _device(state) -> torch.device:
    """Where a rank without gradients (a data-parallel rank whose shards are padding)
    keeps the sum it all-reduces: the collectives' device."""
    if state.distributed and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
