"""The `adamw` optimizer: torch's AdamW on its fused kernel where the device has one,
else the multi-tensor (foreach) path."""
from __future__ import annotations

from typing import List

import torch
from attrs import define, field

import mega
from mega.config import OptimConfig


@define(kw_only=True)
class AdamWConfig(OptimConfig):
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


@mega.hookimpl
def register_optimizers(register):
    register("adamw", build_adamw, config=AdamWConfig)
