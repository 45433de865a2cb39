"""The Transformer-XL schedules against the reference's training loop, replayed here with
torch's own schedulers: the optimizer starts at the full lr; after each step the loop
counts it and, during warmup, sets lr * step / warmup, else calls
CosineAnnealingLR(T_max = max_step - warmup, eta_min).step(step - warmup) (cosine) or
LambdaLR(inv_sqrt multiplier).step(step) (inv_sqrt); constant only warms up."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

from mega.config import config_from_dict
from mega.errors import ConfigError


def _ours(plugins, name, max_lr, max_steps, **kw):
    cfg = config_from_dict({"model": {"optim": {"sched": {"name": name, **kw}}}}, plugins=plugins).model.optim.sched
    return plugins.lr_schedulers.get(name).factory(cfg, max_lr, max_steps)


def reference_lrs(scheduler: str, lr: float, warmup: int, max_step: int, eta_min: float = 0.0):
    """The lr each of the `max_step` optimizer steps runs at, in the reference's loop."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    if scheduler == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max_step - warmup, eta_min=eta_min)
    elif scheduler == "inv_sqrt":
        def lr_lambda(step):
            if step == 0 and warmup == 0:
                return 1.0
            return 1.0 / (step ** 0.5) if step > warmup else step / (warmup ** 1.5)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda=lr_lambda)
    used, train_step = [], 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scheduler.step(epoch) is deprecated, and what the reference calls
        for _ in range(max_step):
            used.append(opt.param_groups[0]["lr"])
            train_step += 1
            if scheduler in ("cosine", "constant"):
                if train_step < warmup:
                    opt.param_groups[0]["lr"] = lr * train_step / warmup
                elif scheduler == "cosine":
                    sched.step(train_step - warmup)
            else:
                sched.step(train_step)
    return used


@pytest.mark.parametrize("warmup", [0, 1, 7])
def test_cosine_with_transformer_xl_warmup_is_the_references(plugins, warmup):
    ours = _ours(plugins, "cosine", 0.01, 40, warmup_steps=warmup, eta_min=0.001, warmup_style="transformer_xl")
    ref = reference_lrs("cosine", 0.01, warmup, 40, eta_min=0.001)
    assert [ours(s) for s in range(40)] == pytest.approx(ref, rel=1e-12, abs=1e-15)


def test_the_wt103_base_schedule_at_its_landmarks(plugins):
    ours = _ours(plugins, "cosine", 0.01, 40000, warmup_steps=1000, eta_min=0.001, warmup_style="transformer_xl")
    assert ours(0) == 0.01  # the first update runs at the full lr (the reference's quirk)
    assert ours(1) == pytest.approx(0.01 / 1000) and ours(999) == pytest.approx(0.01 * 999 / 1000)
    assert ours(1000) == pytest.approx(0.01)
    assert ours(20500) == pytest.approx(0.001 + 0.009 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert ours(39999) == pytest.approx(0.001, rel=1e-4) and ours(50000) == pytest.approx(0.001)


def test_decay_steps_is_the_references_max_step_scheduler(plugins):
    ours = _ours(plugins, "cosine", 0.01, 30, warmup_steps=5, eta_min=0.0, decay_steps=45,
                 warmup_style="transformer_xl")
    assert [ours(s) for s in range(30)] == pytest.approx(reference_lrs("cosine", 0.01, 5, 50)[:30], rel=1e-12)


@pytest.mark.parametrize("warmup", [0, 4])
def test_constant_with_transformer_xl_warmup(plugins, warmup):
    ours = _ours(plugins, "constant", 0.01, 12, warmup_steps=warmup, warmup_style="transformer_xl")
    assert [ours(s) for s in range(12)] == pytest.approx(reference_lrs("constant", 0.01, warmup, 12), rel=1e-12)


@pytest.mark.parametrize("warmup", [0, 4])
def test_inv_sqrt_is_the_references(plugins, warmup):
    ours = _ours(plugins, "inv_sqrt", 0.01, 20, warmup_steps=warmup)
    assert [ours(s) for s in range(20)] == pytest.approx(reference_lrs("inv_sqrt", 0.01, warmup, 20), rel=1e-12)


def test_megatron_warmup_stays_the_default(plugins):
    ours = _ours(plugins, "cosine", 1.0, 110, warmup_steps=10, min_lr=0.1)
    assert [ours(s) for s in range(3)] == pytest.approx([0.1, 0.2, 0.3])


def test_eta_min_is_min_lr_and_both_cannot_disagree(plugins):
    a = _ours(plugins, "cosine", 1.0, 100, eta_min=0.25)
    b = _ours(plugins, "cosine", 1.0, 100, min_lr=0.25)
    assert [a(s) for s in (0, 50, 99, 100)] == [b(s) for s in (0, 50, 99, 100)]
    with pytest.raises(ConfigError, match="model.optim.sched.eta_min"):
        _ours(plugins, "cosine", 1.0, 100, eta_min=0.25, min_lr=0.5)
    with pytest.raises(ConfigError, match="model.optim.sched.warmup_style"):
        _ours(plugins, "cosine", 1.0, 100, warmup_style="txl")
