"""Mixed precision: autocast contexts and Megatron's dynamic loss scaler for fp16.

Parameters and optimizer state stay fp32; matmuls run in bf16/fp16 under
`torch.autocast`. (`model.megatron_amp_O2` holds bf16 parameters instead, with fp32 main
weights and gradients: `mega.runtime.main_params`.) fp16 gradients can overflow, so the loss is multiplied by a scale before
backward; a step whose unscaled gradients hold inf/nan is skipped and the scale backs off
(after `hysteresis` such steps), and it grows again after `growth_interval` clean steps.
"""
from __future__ import annotations

import contextlib
from typing import Iterable

import torch

DTYPES = {"32": None, "16": torch.float16, "bf16": torch.bfloat16}


def autocast(precision: str, device: torch.device):
    dtype = DTYPES[str(precision)]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


class DynamicLossScaler:
    def __init__(self, initial_scale: float = 2.0**32, growth_interval: int = 1000, hysteresis: int = 2,
                 min_scale: float = 1.0, growth_factor: float = 2.0, backoff_factor: float = 0.5):
        self.scale = float(initial_scale)
        self.growth_interval = growth_interval
        self.hysteresis = hysteresis
        self.min_scale = min_scale
        self.growth_factor = growth_factor
        self.backoff_factor = backoff_factor
        self._growth_tracker = 0
        self._hysteresis_tracker = hysteresis

    def unscale_and_check(self, params: Iterable[torch.nn.Parameter]) -> bool:
        """Divide gradients by the scale in place; True when any is inf or nan."""
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return False
        torch._foreach_mul_(grads, 1.0 / self.scale)
        norms = torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])
        return not bool(torch.isfinite(norms).all())

    def update(self, found_inf: bool) -> None:
        if found_inf:
            self._growth_tracker = 0
            self._hysteresis_tracker -= 1
            if self._hysteresis_tracker <= 0:
                self.scale = max(self.scale * self.backoff_factor, self.min_scale)
        else:
            self._growth_tracker += 1
            if self._growth_tracker == self.growth_interval:
                self._growth_tracker = 0
                self._hysteresis_tracker = self.hysteresis
                self.scale *= self.growth_factor

    def state_dict(self) -> dict:
        return {"scale": self.scale, "growth_tracker": self._growth_tracker, "hysteresis_tracker": self._hysteresis_tracker}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])
        self._growth_tracker = int(state["growth_tracker"])
        self._hysteresis_tracker = int(state["hysteresis_tracker"])
