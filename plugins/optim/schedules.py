"""Learning-rate schedules: `cosine` and `linear` decay after linear warmup, `constant`,
and `inv_sqrt` (inverse square root, Transformer-XL's alternative).

A schedule is a pure function of the step (the step about to be taken, from 0), so
resuming needs nothing but the step.

Two warmups (`warmup_style`):

* "megatron" (default): lr = max_lr * (step + 1) / warmup_steps during the first
  warmup_steps steps.
* "transformer_xl": as NVIDIA's Transformer-XL sets it. Its loop builds the optimizer at
  the full lr and updates the lr only after each step, so step 0 runs at max_lr, then
  step s < warmup_steps at max_lr * s / warmup_steps. With `cosine`, `eta_min = 0.001`,
  `warmup_steps = 1000` and `trainer.max_steps = 40000` this is the reference's WT103 base
  schedule, step for step.

The decay reaches `min_lr` (`eta_min` is accepted as the reference's name for it) after
`decay_steps` steps past the warmup (default: to trainer.max_steps, as the reference's
T_max = max_step - warmup_step; its `max_step_scheduler` is `decay_steps + warmup_steps`),
and stays there.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

from attrs import define

import mega
from mega.config import key, SchedConfig
from mega.config.schema import InvalidValue, non_negative

WARMUP_STYLES = ("megatron", "transformer_xl")


def _style(_instance, attribute, value):
    if value not in WARMUP_STYLES:
        raise InvalidValue(attribute.name, f"expected one of {', '.join(map(repr, WARMUP_STYLES))}, got {value!r}")


@define(kw_only=True)
class ConstantConfig(SchedConfig):
    warmup_style: str = key(default="megatron", validator=_style,
            help='"megatron": lr (step+1)/warmup; "transformer_xl": step 0 at lr, then lr step/warmup')


@define(kw_only=True)
class DecayConfig(ConstantConfig):
    decay_steps: Optional[int] = key(None, help="steps from the end of warmup to min_lr; None: to trainer.max_steps")
    eta_min: Optional[float] = key(default=None, validator=non_negative,
            help="Transformer-XL's name for min_lr (set one)")

    def __attrs_post_init__(self):
        if self.eta_min is not None and self.min_lr not in (0.0, self.eta_min):
            raise InvalidValue("eta_min", f"{self.eta_min} and min_lr={self.min_lr} are the same setting; give one")


@define(kw_only=True)
class InvSqrtConfig(SchedConfig):
    """`inv_sqrt` has the common keys only (min_lr is a floor); its own class lists it in
    the configuration reference."""


def _warmup(config: SchedConfig, max_lr: float, step: int) -> Optional[float]:
    """The warmup lr of `step`, None once warmup is over."""
    if step >= config.warmup_steps:
        return None
    if getattr(config, "warmup_style", "megatron") == "transformer_xl":
        return max_lr if step == 0 else max_lr * step / config.warmup_steps
    return max_lr * (step + 1) / config.warmup_steps


def floor_lr(config: DecayConfig) -> float:
    """min_lr, or eta_min when that is set (the config refuses both, set differently)."""
    return config.min_lr if config.eta_min is None else config.eta_min


def _decay(shape: Callable[[float], float]):
    def factory(config: DecayConfig, max_lr: float, max_steps: int) -> Callable[[int], float]:
        span = max(1, (config.decay_steps or max_steps - config.warmup_steps))
        low = floor_lr(config)

        def lr(step: int) -> float:
            warm = _warmup(config, max_lr, step)
            if warm is not None:
                return warm
            progress = min(1.0, (step - config.warmup_steps) / span)
            return low + (max_lr - low) * shape(progress)

        return lr

    return factory


def constant(config: SchedConfig, max_lr: float, max_steps: int) -> Callable[[int], float]:
    """max_lr after warmup. With warmup_style "transformer_xl" the reference's loop never
    sets the lr again once warmup ends, so it stays at max_lr (W - 1) / W (W > 1): kept."""
    w = config.warmup_steps
    after = max_lr
    if getattr(config, "warmup_style", "megatron") == "transformer_xl" and w > 1:
        after = max_lr * (w - 1) / w

    def lr(step: int) -> float:
        warm = _warmup(config, max_lr, step)
        return after if warm is None else warm

    return lr


def inv_sqrt(config: SchedConfig, max_lr: float, max_steps: int) -> Callable[[int], float]:
    """Transformer-XL's `inv_sqrt` (the Transformer paper's), as a multiplier of max_lr:
    step / warmup^1.5 up to warmup_steps, then 1 / sqrt(step); 1 at step 0 without warmup.
    So the peak is max_lr / sqrt(warmup_steps) and step 0 with warmup runs at 0. min_lr
    is a floor (0 by default, as the reference)."""
    w = config.warmup_steps

    def lr(step: int) -> float:
        if step == 0 and w == 0:
            factor = 1.0
        elif step > w:
            factor = 1.0 / math.sqrt(step)
        else:
            factor = step / w ** 1.5
        return max(config.min_lr, max_lr * factor)

    return lr


@mega.hookimpl
def register_lr_schedulers(register):
    register("cosine", _decay(lambda p: 0.5 * (1.0 + math.cos(math.pi * p))), config=DecayConfig)
    register("linear", _decay(lambda p: 1.0 - p), config=DecayConfig)
    register("constant", constant, config=ConstantConfig)
    register("inv_sqrt", inv_sqrt, config=InvSqrtConfig)
