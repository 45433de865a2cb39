"""The `adamw` optimizer: torch's AdamW on its fused kernel where the device has one,
else the multi-tensor (foreach) path.

AdamW's update of each element depends on that element alone, so the distributed optimizer
can shard it anywhere (`sharding = "elementwise"`). NeMo 1 selects its distributed optimizer
by name: `distributed_fused_adam` (apex) and `mcore_distributed_optim` (megatron-core) are
registered here as `adamw` with `use_distributed_optimizer = true`, so NeMo configs carry
over. The algorithm is megatron-core's `DistributedOptimizer` (mega.runtime.distrib_optimizer),
not apex's `DistributedFusedAdam`, whose shards and checkpoints (e.g. bf16 parameter
remainders) differ: apex's checkpoints do not load here.
"""
from __future__ import annotations

from typing import ClassVar, List, Optional

import torch
from attrs import define, field

import mega
from mega.config import OptimConfig


@define(kw_only=True)
class AdamWConfig(OptimConfig):
    sharding: ClassVar[Optional[str]] = "elementwise"

    name: str = "adamw"
    betas: List[float] = field(factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    fused: bool = True  # use the fused kernel when torch has one for the parameters' device


def build_adamw(config: AdamWConfig, param_groups) -> torch.optim.Optimizer:
    if len(config.betas) != 2:
        from mega.errors import ConfigError

        raise ConfigError(f"model.optim.betas: expected two numbers, got {config.betas!r}")
    kwargs = dict(lr=config.lr, betas=tuple(config.betas), eps=config.eps, weight_decay=config.weight_decay)
    if config.fused:
        try:
            return torch.optim.AdamW(param_groups, fused=True, **kwargs)
        except (RuntimeError, TypeError):  # no fused kernel for this device/dtype
            pass
    return torch.optim.AdamW(param_groups, foreach=True, **kwargs)


@define(kw_only=True)
class DistributedFusedAdamConfig(AdamWConfig):
    """NeMo 1's `distributed_fused_adam`: `adamw` with the distributed optimizer on."""

    name: str = "distributed_fused_adam"
    use_distributed_optimizer: bool = True  # shard main weights and optimizer state over data-parallel ranks (megatron-core's algorithm, not apex's)


@define(kw_only=True)
class McoreDistributedOptimConfig(AdamWConfig):
    """NeMo 1's `mcore_distributed_optim`: `adamw` with the distributed optimizer on."""

    name: str = "mcore_distributed_optim"
    use_distributed_optimizer: bool = True  # shard main weights and optimizer state over data-parallel ranks


# names that are the same optimizer (a run may switch between them when resuming)
ALIASES = ("adamw", "distributed_fused_adam", "mcore_distributed_optim")


@mega.hookimpl
def register_optimizers(register):
    register("adamw", build_adamw, config=AdamWConfig)
    register("distributed_fused_adam", build_adamw, config=DistributedFusedAdamConfig)
    register("mcore_distributed_optim", build_adamw, config=McoreDistributedOptimConfig)
