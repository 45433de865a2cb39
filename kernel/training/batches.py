"""Global batches -> this rank's micro-batches, by sample position.

Sample positions are global and sequential (Megatron's pretraining sampler): step s uses
positions [s * global_batch_size, (s + 1) * global_batch_size) of the train dataset. Each
data-parallel rank takes a contiguous slice of them and cuts it into micro-batches. The
position is therefore all a resumed run needs to continue the same data.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch

from mega.errors import ConfigError


def batch_geometry(micro_batch_size: int, global_batch_size, accumulate: int, dp_size: int) -> tuple[int, int]:
    """(global batch size, micro-batches per step on each rank), checked for consistency."""
    if micro_batch_size < 1:
        raise ConfigError(f"model.micro_batch_size: must be at least 1, got {micro_batch_size}")
    if accumulate < 1:
        raise ConfigError(f"trainer.accumulate_grad_batches: must be at least 1, got {accumulate}")
    per_step = micro_batch_size * dp_size
    if global_batch_size is None:
        return per_step * accumulate, accumulate
    if global_batch_size < 1 or global_batch_size % per_step:
        raise ConfigError(
            f"model.global_batch_size={global_batch_size}: must be a positive multiple of micro_batch_size x data-parallel"
            f" size = {micro_batch_size} x {dp_size}"
        )
    n_micro = global_batch_size // per_step
    if accumulate not in (1, n_micro):
        raise ConfigError(
            f"trainer.accumulate_grad_batches={accumulate} disagrees with model.global_batch_size={global_batch_size}"
            f" / (micro_batch_size {micro_batch_size} x data-parallel {dp_size}) = {n_micro}; set one of them"
        )
    return global_batch_size, n_micro


def micro_batch_positions(step: int, global_batch_size: int, micro_batch_size: int, dp_rank: int, dp_size: int) -> List[range]:
    per_rank = global_batch_size // dp_size
    first = step * global_batch_size + dp_rank * per_rank
    return [range(first + i, first + i + micro_batch_size) for i in range(0, per_rank, micro_batch_size)]


def collate(samples: Sequence[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}


def load_micro_batches(dataset, positions: List[range], device: torch.device) -> List[Dict[str, torch.Tensor]]:
    return [{k: v.to(device, non_blocking=True) for k, v in collate([dataset[i] for i in r]).items()} for r in positions]
