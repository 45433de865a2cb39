"""The parallel layout of this process: world, data-parallel, tensor- and pipeline-parallel
sizes and ranks.

Single-process today (every size 1). The training loop already asks this object for the
data-parallel size and rank (batch arithmetic, sample slicing, token counts), so the
parallel runtime slots in here without touching the loop.
"""
from __future__ import annotations

import attrs
import torch

from mega.errors import ConfigError


@attrs.frozen
class ParallelState:
    world_size: int = 1
    rank: int = 0
    dp_size: int = 1
    dp_rank: int = 0
    tp_size: int = 1
    pp_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over data-parallel ranks (identity with one process)."""
        return t


def init_parallel(devices: int, num_nodes: int) -> ParallelState:
    if devices * num_nodes != 1:
        raise ConfigError(
            f"trainer.devices={devices}, trainer.num_nodes={num_nodes}: multi-process training needs the parallel"
            " runtime, which this version of mega does not have yet; use trainer.devices=1"
        )
    return ParallelState()


def pick_device(accelerator: str) -> torch.device:
    if accelerator == "cpu":
        return torch.device("cpu")
    if accelerator in ("gpu", "cuda"):
        if not torch.cuda.is_available():
            raise ConfigError("trainer.accelerator: \"gpu\" asked for, but torch sees no CUDA device")
        return torch.device("cuda")
    if accelerator == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    raise ConfigError(f"trainer.accelerator: expected \"cpu\", \"gpu\" or \"auto\", got {accelerator!r}")
