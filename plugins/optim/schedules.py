"""Learning-rate schedules: `cosine` and `linear` decay after linear warmup, `constant`.

A schedule is a pure function of the step (the step about to be taken, from 0), so
resuming needs nothing but the step. Warmup follows Megatron: lr = max_lr * (step + 1) /
warmup_steps during the first warmup_steps steps.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

from attrs import define

import mega
from mega.config import SchedConfig


@define(kw_only=True)
class DecayConfig(SchedConfig):
    decay_steps: Optional[int] = None  # steps from the end of warmup to min_lr; None: to trainer.max_steps


def _warmup(config: SchedConfig, max_lr: float, step: int) -> Optional[float]:
    if step < config.warmup_steps:
        return max_lr * (step + 1) / config.warmup_steps
    return None


def _decay(shape: Callable[[float], float]):
    def factory(config: DecayConfig, max_lr: float, max_steps: int) -> Callable[[int], float]:
        span = max(1, (config.decay_steps or max_steps - config.warmup_steps))

        def lr(step: int) -> float:
            warm = _warmup(config, max_lr, step)
            if warm is not None:
                return warm
            progress = min(1.0, (step - config.warmup_steps) / span)
            return config.min_lr + (max_lr - config.min_lr) * shape(progress)

        return lr

    return factory


def constant(config: SchedConfig, max_lr: float, max_steps: int) -> Callable[[int], float]:
    return lambda step: _warmup(config, max_lr, step) or max_lr


@mega.hookimpl
def register_lr_schedulers(register):
    register("cosine", _decay(lambda p: 0.5 * (1.0 + math.cos(math.pi * p))), config=DecayConfig)
    register("linear", _decay(lambda p: 1.0 - p), config=DecayConfig)
    register("constant", constant, config=SchedConfig)
