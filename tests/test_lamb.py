"""The `lamb` optimizer against a float64 transcription of the Transformer-XL reference's
LAMB rule, written here from its description (no bias correction, eps 1e-6 in both
denominators, decay added to the Adam step, ||p|| clamped to [0, 10], trust 1 when a norm
is zero), and `fused_lamb`'s behaviour without apex."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mega.testing import run_ranks


def reference_lamb(params, grads_per_step, lr, b1=0.9, b2=0.999, eps=1e-6, wd=0.0):
    """The rule step by step in float64 numpy, one tensor at a time."""
    ps = [np.array(p, dtype=np.float64) for p in params]
    ms = [np.zeros_like(p) for p in ps]
    vs = [np.zeros_like(p) for p in ps]
    for grads in grads_per_step:
        for i, g in enumerate(grads):
            g = np.array(g, dtype=np.float64)
            ms[i] = b1 * ms[i] + (1 - b1) * g
            vs[i] = b2 * vs[i] + (1 - b2) * g * g
            u = ms[i] / (np.sqrt(vs[i]) + eps) + wd * ps[i]
            w = min(math.sqrt(float((ps[i] ** 2).sum())), 10.0)
            a = math.sqrt(float((u ** 2).sum()))
            trust = 1.0 if w == 0.0 or a == 0.0 else w / (a + eps)
            ps[i] = ps[i] - lr * trust * u
    return ps


def _tensors(seed=0):
    """A small tensor, one of norm > 10 (the clamp), a zero tensor (trust 1) and a bias."""
    g = torch.Generator().manual_seed(seed)
    return [0.02 * torch.randn(8, 6, generator=g), 3.0 * torch.randn(5, 7, generator=g), torch.zeros(6),
            0.5 * torch.randn(4, generator=g)]


def _grads(shapes, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g) * (0.1 + i) for i, s in enumerate(shapes)] for _ in range(steps)]


def _run_ours(tensors, grads_per_step, dtype, **kwargs):
    from mega.plugins.optim.lamb import Lamb

    params = [torch.nn.Parameter(t.clone().to(dtype)) for t in tensors]
    opt = Lamb(params, **kwargs)
    for grads in grads_per_step:
        for p, g in zip(params, grads):
            p.grad = g.clone().to(dtype)
        opt.step()
    return [p.detach().double().numpy() for p in params]


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_lamb_follows_the_reference_rule_over_five_steps(wd):
    tensors = _tensors()
    assert torch.linalg.norm(tensors[1]) > 10  # the clamp is exercised
    grads = _grads([t.shape for t in tensors], steps=5)
    ref = reference_lamb([t.numpy() for t in tensors], [[g.numpy() for g in s] for s in grads], lr=0.01, wd=wd)
    exact = _run_ours(tensors, grads, torch.float64, lr=0.01, weight_decay=wd)
    single = _run_ours(tensors, grads, torch.float32, lr=0.01, weight_decay=wd)
    for r, e, s in zip(ref, exact, single):
        np.testing.assert_allclose(e, r, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(s, r, rtol=1e-5, atol=1e-7)


def test_first_step_of_a_zero_tensor_is_a_plain_non_debiased_adam_step():
    """Trust 1 (||p|| = 0): u = 0.1 g / (sqrt(0.001) |g| + eps) ~ 3.16 sign(g)."""
    g = torch.tensor([0.5, -2.0, 1e-3])
    out = _run_ours([torch.zeros(3)], [[g]], torch.float64, lr=0.01)[0]
    expected = -0.01 * (0.1 * g.double()) / (math.sqrt(0.001) * g.double().abs() + 1e-6)
    np.testing.assert_allclose(out, expected.numpy(), rtol=1e-12)


def test_a_large_tensor_moves_at_most_lr_times_ten():
    big = torch.full((100, 100), 1.0)  # norm 100, clamped to 10
    out = _run_ours([big], [[torch.randn(100, 100)]], torch.float64, lr=0.01)[0]
    moved = np.linalg.norm(out - big.double().numpy())
    assert moved <= 0.01 * 10 * (1 + 1e-9) and moved > 0.01 * 9.99


def test_adam_switch_forces_trust_one():
    t = [3.0 * torch.ones(5, 5)]
    g = [[torch.linspace(-1, 1, 25).reshape(5, 5)]]
    out = _run_ours(t, g, torch.float64, lr=0.01, adam=True)[0]
    m, v = 0.1 * g[0][0].double(), 0.001 * g[0][0].double() ** 2
    np.testing.assert_allclose(out, (t[0].double() - 0.01 * m / (v.sqrt() + 1e-6)).numpy(), rtol=1e-12)


def test_lamb_is_a_registered_optimizer_with_the_reference_defaults(mega_plugins):
    from mega.config import load_config

    entry = mega_plugins.optimizers.get("lamb")
    cfg = entry.config()
    assert (cfg.lr, cfg.eps, list(cfg.betas), cfg.weight_decay) == (0.01, 1e-6, [0.9, 0.999], 0.0)
    opt = entry.factory(cfg, [{"params": [torch.nn.Parameter(torch.ones(2))], "weight_decay": 0.0}])
    assert opt.param_groups[0]["eps"] == 1e-6
    from mega.errors import ConfigError

    with pytest.raises(ConfigError, match="model.optim.betas"):
        entry.factory(entry.config(betas=[0.9]), [torch.nn.Parameter(torch.ones(2))])


def test_a_tiny_gpt_trains_with_lamb(mega_experiment):
    from mega.testing import read_metrics

    run = mega_experiment.run(model={"optim": {"name": "lamb", "lr": 0.01, "sched": {"name": "constant"}}},
                              trainer={"max_steps": 6, "val_check_interval": 0})
    losses = [m["loss"] for m in read_metrics(run.run_dir) if "loss" in m]
    assert losses[-1] < losses[0]
    assert set(run.optimizer.state[next(run.model.parameters())]) == {"step", "exp_avg", "exp_avg_sq"}


def test_fused_lamb_without_apex_is_a_clear_config_error(mega_plugins, monkeypatch):
    from mega.errors import ConfigError
    from mega.plugins.optim import lamb

    monkeypatch.setattr(lamb, "_apex_fused_lamb", lambda: None)
    entry = mega_plugins.optimizers.get("fused_lamb")
    with pytest.raises(ConfigError, match="apex is not installed"):
        entry.factory(entry.config(), [torch.nn.Parameter(torch.ones(2))])


def test_fused_lamb_runs_when_apex_and_cuda_are_there(mega_plugins):
    from mega.plugins.optim.lamb import _apex_fused_lamb

    if _apex_fused_lamb() is None or not torch.cuda.is_available():
        pytest.skip("needs NVIDIA apex with its CUDA extensions and a GPU")
    entry = mega_plugins.optimizers.get("fused_lamb")
    p = torch.nn.Parameter(torch.ones(4, 4, device="cuda"))
    opt = entry.factory(entry.config(), [{"params": [p], "weight_decay": 0.01}])
    p.grad = torch.full_like(p, 0.5)
    opt.step()
    assert torch.isfinite(p).all() and not torch.equal(p.detach(), torch.ones_like(p))


def _tp_shards(state, full_p, full_g):
    """Each rank holds half of every split tensor (partition_dim set) and the whole of a
    replicated one; returns this rank's tensors after three steps."""
    from mega.plugins.optim.lamb import Lamb

    params = []
    for t, dim in zip(full_p, (0, 1, None)):
        part = t.chunk(state.tp_size, dim)[state.tp_rank] if dim is not None else t
        p = torch.nn.Parameter(part.clone())
        p.partition_dim = dim
        params.append(p)
    opt = Lamb(params, lr=0.01)
    for step_grads in full_g:
        for p, g, dim in zip(params, step_grads, (0, 1, None)):
            p.grad = (g.chunk(state.tp_size, dim)[state.tp_rank] if dim is not None else g).clone()
        opt.step()
    return [p.detach() for p in params]


@pytest.mark.slow
def test_tensor_parallel_trust_ratios_are_the_whole_tensors():
    full_p = [0.3 * torch.randn(6, 4), 4.0 * torch.randn(4, 6), torch.randn(5)]
    full_g = _grads([t.shape for t in full_p], steps=3)
    ref = reference_lamb([t.numpy() for t in full_p], [[g.numpy() for g in s] for s in full_g], lr=0.01)
    ranks = run_ranks(_tp_shards, world=2, tp=2, args=(full_p, full_g))
    merged = [torch.cat([r[0] for r in ranks], 0), torch.cat([r[1] for r in ranks], 1), ranks[0][2]]
    for m, r in zip(merged, ref):
        np.testing.assert_allclose(m.double().numpy(), r, rtol=1e-5, atol=1e-7)
    assert torch.equal(ranks[0][2], ranks[1][2])
