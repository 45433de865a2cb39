"""`model.megatron_amp_O2` (bf16 parameters, fp32 main weights, fp32 gradient accumulation)
against references: a float64 transcription of AdamW on the fp32 sum of the bf16 model's
micro-batch gradients; the fp32 sum against bf16 accumulation; resumed == uninterrupted;
PP=2 and DP=2 against one process, bucketed all-reduce against one collective; the loss
curve against fp32 training."""
from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

from mega.errors import ConfigError
from mega.plugin_manager import load_plugins
from mega.testing import read_metrics, tiny_config
from mega.training.batches import load_micro_batches, micro_batch_positions
from mega.training.loop import _losses, _num_tokens, train, train_step, validate
from mega.training.run import build_run

ROOT = Path(__file__).resolve().parents[1]
NO_DROPOUT = {"hidden_dropout": 0.0, "attention_dropout": 0.0}


def _o2(tmp_path, corpus, plugins, *overrides, **sections):
    model = {"megatron_amp_O2": True, **NO_DROPOUT, **sections.pop("model", {})}
    trainer = {"precision": "bf16", "accelerator": "cpu", **sections.pop("trainer", {})}
    return tiny_config(tmp_path, corpus, plugins, list(overrides), model=model, trainer=trainer, **sections)


def _step_batches(run, step=0):
    cfg = run.config
    positions = micro_batch_positions(step, run.global_batch_size, cfg.model.micro_batch_size, 0, 1)
    return load_micro_batches(run.train_data, positions, run.device)


def _bf16_copy(model):
    """The reference model: the same weights rounded to bf16 (what the layout holds)."""
    ref = copy.deepcopy(model)
    for p in ref.parameters():
        p.data = p.data.to(torch.bfloat16)
    return ref


def _micro_batch_grads(ref, batches, num_tokens):
    """Each micro-batch's bf16 gradients of the reference model (no autocast), by name."""
    out = []
    for mb in batches:
        ref.zero_grad(set_to_none=True)
        (ref.training_loss(mb)["loss_sum"] / num_tokens).backward()
        out.append({n: p.grad.clone() for n, p in ref.named_parameters() if p.grad is not None})
    return out


def test_fp32_accumulation_equals_the_fp32_sum_of_bf16_grads(tmp_path, corpus, plugins):
    """(b) 4 micro-batches: the main_grad buffer is exactly the fp32 sum of the bf16
    micro-batch gradients, and closer to their float64 sum than bf16 accumulation is."""
    cfg = _o2(tmp_path, corpus, plugins, model={"micro_batch_size": 2, "global_batch_size": 8})
    run = build_run(cfg, plugins)
    ref = _bf16_copy(run.model)
    batches = _step_batches(run)
    run.main_params.prepare()
    n = _num_tokens(run, batches)
    _losses(run, batches, n)
    grads = _micro_batch_grads(ref, batches, n)
    assert len(grads) == 4
    names = [name for name, _ in ref.named_parameters()]
    worst_fp32, worst_bf16, bf16_differs = 0.0, 0.0, 0
    for name, p in zip(names, run.model.parameters()):
        assert p.dtype == torch.bfloat16 and p.grad is None and p.main_grad.dtype == torch.float32
        fp32 = sum((g[name].float() for g in grads[1:]), grads[0][name].float())
        bf16 = sum((g[name] for g in grads[1:]), grads[0][name])
        exact = sum(g[name].double() for g in grads)
        assert torch.equal(p.main_grad, fp32), name
        worst_fp32 = max(worst_fp32, float((fp32.double() - exact).abs().max()))
        worst_bf16 = max(worst_bf16, float((bf16.double() - exact).abs().max()))
        bf16_differs += int(not torch.equal(bf16.float(), fp32))
    print(f"fp32 accumulation: max |err| vs float64 {worst_fp32:.3g}; bf16 accumulation {worst_bf16:.3g};"
          f" {bf16_differs} tensors differ")
    assert bf16_differs > 0  # bf16 accumulation would have rounded differently: the buffer is fp32
    assert worst_fp32 < worst_bf16 / 100, (worst_fp32, worst_bf16)


def _adamw64(p, g, lr, wd, b1, b2, eps):
    """One AdamW step from zero moments (step 1), in float64."""
    m, v = (1 - b1) * g, (1 - b2) * g * g
    m_hat, v_hat = m / (1 - b1), v / (1 - b2)
    return p * (1 - lr * wd) - lr * m_hat / (v_hat.sqrt() + eps)


def test_one_step_equals_fp32_adamw_on_the_fp32_accumulated_grads(tmp_path, corpus, plugins):
    """(a) main weights after a step == float64 AdamW (with clipping) applied to the fp32
    main weights and the fp32-accumulated gradients of the bf16 model."""
    cfg = _o2(tmp_path, corpus, plugins, "trainer.gradient_clip_val=0.05",
              model={"micro_batch_size": 2, "global_batch_size": 8, "optim": {"weight_decay": 0.1}})
    run = build_run(cfg, plugins)
    start = {n: p.detach().double() for n, p in run.model.named_parameters()}
    ref = _bf16_copy(run.model)
    batches = _step_batches(run)
    grads = _micro_batch_grads(ref, batches, _num_tokens(run, batches))
    metrics = train_step(run)
    assert run.optimizer.param_groups[0]["params"][0].dtype == torch.float32

    summed = {n: sum((g[n].float() for g in grads[1:]), grads[0][n].float()).double() for n in start}
    norm = math.sqrt(sum(float(g.pow(2).sum()) for g in summed.values()))
    assert float(metrics["grad_norm"]) == pytest.approx(norm, rel=1e-6)
    clip = min(1.0, 0.05 / (norm + 1e-6))
    assert clip < 1.0  # clipping took part
    o = cfg.model.optim
    lr = run.lr_at(0)
    after = run.model_state_dict()
    worst = 0.0
    for (name, p0), low in zip(start.items(), run.model.parameters()):
        wd = o.weight_decay if p0.dim() >= 2 else 0.0
        want = _adamw64(p0, summed[name] * clip, lr, wd, o.betas[0], o.betas[1], o.eps)
        got = after[name]
        assert got.dtype == torch.float32
        ulp = torch.finfo(torch.float32).eps * want.abs().clamp(min=2.0**-10)  # fp32 spacing near the value
        worst = max(worst, float(((got.double() - want).abs() / ulp).max()))
        assert torch.equal(low, got.to(torch.bfloat16)), name  # the model holds the rounded main weights
    print(f"one step vs float64 AdamW: {worst:.3g} fp32 ulps; grad norm {float(metrics['grad_norm'])!r} vs {norm!r}")
    assert worst <= 4.0, worst  # a few fp32 roundings (decay, update) of the float64 transcription; measured 1.33


def test_resumed_run_equals_uninterrupted_bit_for_bit(tmp_path, corpus, plugins):
    """(c) 4 steps == 2 steps + checkpoint + 2 steps, weights and optimizer state exactly."""
    import mega

    class CrashAt:
        @mega.hookimpl
        def on_step_end(self, run, step, metrics):
            if step == 3:
                raise RuntimeError("simulated crash")

    sections = dict(trainer={"max_steps": 4, "val_check_interval": 2},
                    exp_manager={"checkpoint": {"every_n_train_steps": 2, "keep_last_k": 0}})
    straight = build_run(_o2(tmp_path, corpus, plugins, "exp_manager.name=straight", **copy.deepcopy(sections)), plugins)
    train(straight)
    crashing = load_plugins(extra=[CrashAt()])
    cfg = _o2(tmp_path, corpus, crashing, "exp_manager.name=resumed", **copy.deepcopy(sections))
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(build_run(cfg, crashing))
    resumed = build_run(cfg, plugins)
    assert resumed.step == 2
    train(resumed)
    a, b = read_metrics(straight.run_dir), read_metrics(resumed.run_dir)
    assert [(m.get("loss"), m.get("val_loss"), m.get("grad_norm")) for m in a] == \
        [(m.get("loss"), m.get("val_loss"), m.get("grad_norm")) for m in b]
    wa, wb = straight.model_state_dict(), resumed.model_state_dict()
    assert all(v.dtype == torch.float32 for v in wa.values() if v.is_floating_point())
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    sa, sb = straight.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])
    assert all(torch.equal(x, y) for x, y in zip(straight.model.parameters(), resumed.model.parameters()))


@pytest.mark.slow
def test_loss_curve_stays_close_to_fp32_training(tmp_path, corpus, plugins):
    """(f) 30 steps of a tiny GPT: per-step losses within 1% of fp32 training's."""
    sections = dict(trainer={"max_steps": 30, "val_check_interval": 0, "accelerator": "cpu"}, model=NO_DROPOUT)
    fp32 = build_run(tiny_config(tmp_path, corpus, plugins, ["exp_manager.name=fp32"], **copy.deepcopy(sections)), plugins)
    train(fp32)
    o2 = build_run(_o2(tmp_path, corpus, plugins, "exp_manager.name=o2", trainer={"max_steps": 30, "val_check_interval": 0}),
                   plugins)
    train(o2)
    a = [m["loss"] for m in read_metrics(fp32.run_dir)]
    b = [m["loss"] for m in read_metrics(o2.run_dir)]
    assert len(a) == len(b) == 30 and b[-1] < b[0] - 0.3  # it trains
    rel = max(abs(x - y) / x for x, y in zip(a, b))
    print(f"30 steps, max relative loss difference to fp32: {rel:.3g}; final {a[-1]:.4f} vs {b[-1]:.4f}")
    assert rel < 1e-2, rel


def test_fp16_parameters_with_the_loss_scaler(tmp_path, corpus, plugins):
    """trainer.precision = 16: fp16 parameters, the scaled loss's gradients accumulate in
    fp32 and are unscaled and checked there. An overflowing step (the default 2**32 scale)
    is skipped with the weights untouched; with a workable scale the losses follow fp32
    training's (measured within 1e-5 relative over 6 steps)."""
    sections = dict(trainer={"val_check_interval": 0, "accelerator": "cpu"}, model=NO_DROPOUT)
    cfg = _o2(tmp_path, corpus, plugins, "exp_manager.name=overflow", "trainer.precision=16")
    run = build_run(cfg, plugins)
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    metrics = train_step(run)
    assert float(metrics["skipped"]) == 1.0 and {p.dtype for p in run.model.parameters()} == {torch.float16}
    assert all(torch.equal(before[k], v) for k, v in run.model_state_dict().items())
    assert all(torch.equal(before[k].half(), v) for k, v in run.model.state_dict().items())

    fp32 = build_run(tiny_config(tmp_path, corpus, plugins, ["exp_manager.name=fp32"], **copy.deepcopy(sections)), plugins)
    train(fp32)
    fp16 = build_run(_o2(tmp_path, corpus, plugins, "exp_manager.name=fp16", "trainer.precision=16",
                         "model.native_amp_init_scale=65536", trainer={"val_check_interval": 0}), plugins)
    train(fp16)
    a = [m["loss"] for m in read_metrics(fp32.run_dir)]
    b = [m for m in read_metrics(fp16.run_dir)]
    assert not any(m["skipped"] for m in b)
    rel = max(abs(x - y["loss"]) / x for x, y in zip(a, b))
    print(f"fp16 O2, 6 steps: max relative loss difference to fp32 {rel:.3g}")
    assert rel < 1e-3, rel


def test_the_switch_needs_16_bit_precision(tmp_path, corpus, plugins):
    with pytest.raises(ConfigError, match="trainer.precision"):
        build_run(tiny_config(tmp_path, corpus, plugins, model={"megatron_amp_O2": True}), plugins)


class _Net(torch.nn.Module):
    """Three layers and one parameter that never gets a gradient (between them)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 16), torch.nn.Linear(16, 16)
        self.unused = torch.nn.Linear(16, 16)
        self.c = torch.nn.Linear(16, 4)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x))))).float().pow(2).sum()


def test_buckets_start_in_order_during_the_last_backward(monkeypatch):
    """DP=2 simulated (an all-reduce of two identical replicas doubles): the buffer holds
    the parameters in reverse order, cut into buckets of at least `bucket_size` elements
    without splitting a parameter; micro-batches inside no_sync() start nothing; in the
    last one each bucket starts, in order, once its parameters' gradients are in, up to
    the one holding the unused parameter, which `reduce_grads` starts after the backward.
    The averaged buffer is the fp32 sum of the micro-batches' bf16 gradients."""
    from mega.runtime import main_params as mp

    started = []

    class Handle:
        def __init__(self, t):
            self.t = t

        def wait(self):
            self.t.mul_(2)  # the other replica's identical gradients

    def all_reduce(t, group=None, async_op=False):
        started.append(t.data_ptr())
        assert async_op
        return Handle(t)

    monkeypatch.setattr(mp.dist, "all_reduce", all_reduce)
    torch.manual_seed(0)
    net = _Net()
    ref = _bf16_copy(net)
    main = mp.MainParams(net, torch.bfloat16, dp_size=2, bucket_size=60)
    main.prepare()
    params = main.params
    assert params[-1].main_grad.data_ptr() == main.grad_buffer.data_ptr()  # the last parameter first
    buckets = main.buckets
    assert sum(b.view.numel() for b in buckets) == main.grad_buffer.numel() and len(buckets) >= 4
    assert all(b.view.numel() >= 60 for b in buckets[:-1])
    assert all(sum(p.numel() for p in b.params) == b.view.numel() for b in buckets)
    unused = next(i for i, b in enumerate(buckets) if any(p is net.unused.weight for p in b.params))
    assert 0 < unused < len(buckets) - 1
    xs = [torch.randn(4, 8).to(torch.bfloat16) for _ in range(3)]
    for x in xs[:-1]:
        with main.no_sync():
            net(x).backward()
    assert started == []
    net(xs[-1]).backward()
    assert started == [b.view.data_ptr() for b in buckets[:unused]]
    stepped = main.reduce_grads()
    assert started == [b.view.data_ptr() for b in buckets]
    assert len(stepped) == len(params)  # replicas step every parameter
    grads = [dict() for _ in xs]
    for g, x in zip(grads, xs):
        ref.zero_grad(set_to_none=True)
        ref(x).backward()
        g.update({n: p.grad for n, p in ref.named_parameters() if p.grad is not None})
    for (name, _), p in zip(ref.named_parameters(), params):
        want = sum((g[name].float() for g in grads[1:]), grads[0][name].float()) if name in grads[0] else 0 * p.main_grad
        assert torch.equal(p.main_grad, want), name
    main.prepare()  # the next step starts afresh
    assert all(b.handle is None and b.pending == len(b.params) for b in buckets) and main._next == 0


def test_a_model_that_needs_autocast_fails_with_a_config_error(tmp_path, corpus, plugins):
    """A model whose fp32 buffer meets its bf16 weights outside autocast (as Transformer-XL's
    sinusoids did before they took the weights' dtype): the first step names the key
    instead of a bare dtype error."""
    run = build_run(_o2(tmp_path, corpus, plugins, trainer={"max_steps": 1, "val_check_interval": 0}), plugins)
    fp32_buffer = torch.ones(2, 2)

    def training_loss(batch):
        weight = next(run.model.parameters())
        return {"loss_sum": (fp32_buffer @ weight[:2, :2]).sum()}

    run.model.training_loss = training_loss
    with pytest.raises(ConfigError, match="model.megatron_amp_O2"):
        train(run)


def test_an_fp32_checkpoint_resumes_under_the_layout_and_back(tmp_path, corpus, plugins):
    """The checkpoints of both layouts are the same fp32 state: a run can switch."""
    base = dict(trainer={"max_steps": 2, "val_check_interval": 0, "accelerator": "cpu", "precision": "bf16"},
                model=NO_DROPOUT)
    first = build_run(tiny_config(tmp_path, corpus, plugins, **copy.deepcopy(base)), plugins)
    train(first)
    second = build_run(_o2(tmp_path, corpus, plugins, trainer={"max_steps": 4, "val_check_interval": 0}), plugins)
    assert second.step == 2
    train(second)
    third = build_run(tiny_config(tmp_path, corpus, plugins, ["trainer.max_steps=6"], **copy.deepcopy(base)), plugins)
    assert third.step == 4
    train(third)
    losses = [m["loss"] for m in read_metrics(third.run_dir)]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]


# --- data and tensor parallelism (gloo, CPU workers) ------------------------------------------


STEPS = 4
LAYOUT = {"micro_batch_size": 2, "global_batch_size": 8}  # 4 micro-batches a step (2 per replica at DP=2)


def _parallel_config(d, corpus, name, *overrides, devices=1, **model):
    plugins = load_plugins()
    cfg = tiny_config(d, corpus, plugins, [f"exp_manager.name={name}", *overrides],
                      model={"megatron_amp_O2": True, **NO_DROPOUT, **LAYOUT, **model},
                      trainer={"precision": "bf16", "accelerator": "cpu", "devices": devices, "max_steps": STEPS + 1,
                               "val_check_interval": STEPS + 1, "limit_val_batches": 1, "dist_timeout_s": 60})
    return cfg, plugins


def _first_main_grads(run) -> dict:
    """Filled at the first step with the reduced fp32 main gradients (before clipping),
    under one-process names; a last stage's copy of the tied embedding's as "head"."""
    from mega.runtime.sharding import sharding_of, to_global

    grads, reduce = {}, run.main_params.reduce_grads

    def capture():
        stepped = reduce()
        if not grads:
            named = {n: p.main_grad.clone() for n, p in run.model.named_parameters()}
            grads.update(to_global(named, sharding_of(run.model, run.parallel)))
            if "word_embeddings_for_head.weight" in named:  # a last stage's copy of the tied embedding
                grads["head"] = named["word_embeddings_for_head.weight"]
        return stepped

    run.main_params.reduce_grads = capture
    return grads


def _train_steps(run, steps=STEPS, overflow_at=None, overflow_here=True):
    """`steps` optimizer steps; per step (loss, grad_norm, skipped). At step `overflow_at`
    this rank's unscale check reports inf/nan (if `overflow_here`), as an overflowing fp16
    gradient would: every rank must skip that step with it."""
    out = []
    for _ in range(steps):
        if run.step == overflow_at and overflow_here:
            check = run.scaler.unscale_and_check
            run.scaler.unscale_and_check = lambda params: check(params) or True
        m = train_step(run)
        if run.scaler is not None:
            run.scaler.__dict__.pop("unscale_and_check", None)
        run.step += 1
        out.append((float(m["loss"]), float(m["grad_norm"]), float(m.get("skipped", 0.0))))
    return out


def _global_weights(run):
    """The fp32 main weights under one-process names, and this stage's copy of the tied
    word embedding, if it holds one."""
    from mega.runtime.sharding import sharding_of, to_global

    state = {k: v.clone() for k, v in run.model_state_dict().items()}  # not views of weights that go on training
    return to_global(state, sharding_of(run.model, run.parallel)), state.get("word_embeddings_for_head.weight")


def _parallel_runs(state, d, corpus):
    """One launch of 2 gloo workers, several runs in turn (each builds its own groups):
    PP=2 in bf16 (validated, saved, resumed); PP=2 in fp16 with an overflow only the last stage sees at step 2; DP=2
    with one all-reduce, and with small buckets and an unused parameter."""
    from mega.runtime.parallel import current

    out = {}
    cfg, plugins = _parallel_config(d, corpus, "pp2", devices=2, pipeline_model_parallel_size=2)
    run = build_run(cfg, plugins)
    grads = _first_main_grads(run)
    out["pp2"] = _train_steps(run), _global_weights(run), grads, validate(run)["val_loss"]
    # the checkpoint holds the fp32 main weights; resuming from it continues bit for bit
    path = run.save_checkpoint()
    saved = torch.load(path / f"mp_rank_00_{run.parallel.pp_rank:03d}" / "model.pt", weights_only=True)
    main = run.model_state_dict()
    assert saved.keys() == main.keys(), saved.keys() ^ main.keys()
    assert [k for k in main if not torch.equal(saved[k], main[k])] == []
    assert {v.dtype for v in saved.values() if v.is_floating_point()} == {torch.float32}
    resumed = build_run(cfg, plugins)
    assert resumed.step == STEPS
    out["pp2_resumed"] = _train_steps(run, 1) == _train_steps(resumed, 1) and all(
        torch.equal(a, b) for a, b in zip(run.model_state_dict().values(), resumed.model_state_dict().values()))
    cfg, plugins = _parallel_config(d, corpus, "pp2_fp16", "trainer.precision=16", "model.native_amp_init_scale=65536",
                                    devices=2, pipeline_model_parallel_size=2)
    run = build_run(cfg, plugins)
    out["pp2_fp16"] = _train_steps(run, 3, overflow_at=1, overflow_here=current().is_last_stage)
    for name, bucket in (("dp2", 0), ("dp2_buckets", 4096)):
        cfg, plugins = _parallel_config(d, corpus, name, f"model.grad_reduce_bucket_size={bucket}", devices=2)
        run = build_run(cfg, plugins)
        run.model.register_parameter("unused", torch.nn.Parameter(torch.ones(3)))  # no gradient, ever
        started = []
        _start = run.main_params._start
        run.main_params._start = lambda b: (started.append(run.main_params._syncing and not b.pending), _start(b))
        steps = _train_steps(run)
        out[name] = steps, _global_weights(run)[0], len(run.main_params.buckets), started.count(True) // STEPS
    return out


@pytest.mark.slow
def test_pipeline_and_data_parallel_equal_one_process(tmp_path, corpus):
    """One launch of 2 workers (gloo) against one process (on one thread, as each worker:
    LayerNorm's weight gradient sums in another order on more threads), 4 steps of 4
    micro-batches, gradients clipped (norm ~1.8 > 1.0):

    * PP=2 (bf16 hidden states between the stages, the tied word embedding's fp32 main
      gradients summed over them, global clipping): the first step's fp32 main gradients
      are bit for bit one process's, except the word embedding's. One process adds its
      lookup and output-layer gradients of a micro-batch in bf16 (autograd) before they
      reach fp32; two stages sum them in fp32. So they differ by bf16 roundings of 4
      micro-batch sums: within 4 x 2^-9 of the largest element (measured 1.9e-3).
      Over 4 steps that noise leaves losses within 1e-5 relative (measured 2.7e-6), grad
      norms within 1e-3 (4.8e-4), the validation loss within 1e-4 (3.9e-6), weights within
      1e-4 (4.7e-5) but for the key bias, which AdamW moves by up to lr on noise (its
      exact gradient is 0): within 2 x lr (8.4e-4). The checkpoint holds the fp32 main
      weights, and a run resumed from it takes the next step bit for bit.
    * PP=2, fp16: an inf only the last stage sees makes both stages skip the step; the
      losses of the other steps follow one process's (measured: identical).
    * DP=2 with 4096-element buckets started during the backward equals one all-reduce
      after it bit for bit (a sum of two addends is the same in any order), with an
      unused parameter whose bucket (the last) starts after the backward. Against one
      process only the order of the fp32 sums differs: metrics within 1e-5 relative
      (measured 7.7e-8), weights within 1e-6 (3.7e-9)."""
    from mega.testing import run_ranks

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg, plugins = _parallel_config(tmp_path, corpus, "one")
        one = build_run(cfg, plugins)
        one_grads = _first_main_grads(one)
        one_steps, one_weights, one_val = _train_steps(one), _global_weights(one)[0], validate(one)["val_loss"]
        cfg, plugins = _parallel_config(tmp_path, corpus, "one_fp16", "trainer.precision=16",
                                        "model.native_amp_init_scale=65536")
        one_fp16 = _train_steps(build_run(cfg, plugins), 3, overflow_at=1)
    finally:
        torch.set_num_threads(threads)

    ranks = run_ranks(_parallel_runs, world=2, args=(tmp_path, corpus), timeout=400)

    def rel(a, b, i):
        return max(abs(x[i] - y[i]) / abs(x[i]) for x, y in zip(a, b))

    def wdiff(a, b, keys):
        return max(float((a[k].double() - b[k].double()).abs().max()) for k in keys)

    # PP=2 vs PP=1
    (steps0, (w0, _), g0, val), (steps1, (w1, head), g1, _) = ranks[0]["pp2"], ranks[1]["pp2"]
    assert ranks[0]["pp2_resumed"] and ranks[1]["pp2_resumed"]
    assert steps0 == steps1 and all(s[1] > 1.0 for s in one_steps)  # every stage logs the same; clipping took part
    emb = "language_model.embedding.word_embeddings.weight"
    assert torch.equal(g0[emb], g1.pop("head")) and torch.equal(head, w0[emb])  # the tied copies stay tied
    pp_grads, pp_weights = {**g0, **g1}, {**w0, **w1}
    assert pp_grads.keys() == one_grads.keys() and pp_weights.keys() == one_weights.keys()
    assert [k for k in one_grads if not torch.equal(one_grads[k], pp_grads[k])] == [emb]
    emb_diff = float((one_grads[emb] - pp_grads[emb]).abs().max() / one_grads[emb].abs().max())
    assert all(v.dtype == torch.float32 for v in pp_weights.values() if v.is_floating_point())
    bias = [k for k in one_weights if k.endswith("query_key_value.bias")]
    val_rel = abs(val - one_val) / one_val
    pp = (rel(one_steps, steps0, 0), rel(one_steps, steps0, 1),
          wdiff(one_weights, pp_weights, [k for k in one_weights if k not in bias]), wdiff(one_weights, pp_weights, bias))
    # PP=2 fp16 with a one-stage overflow vs one process with the same overflow
    assert [s[2] for s in ranks[0]["pp2_fp16"]] == [s[2] for s in ranks[1]["pp2_fp16"]] == [0.0, 1.0, 0.0]
    fp16_rel = rel(one_fp16, ranks[0]["pp2_fp16"], 0)
    # DP=2: buckets vs one all-reduce vs one process
    (dp, dp_w, one_bucket, _), (bk, bk_w, n_buckets, early) = ranks[0]["dp2"], ranks[0]["dp2_buckets"]
    assert ranks[1]["dp2"][0] == dp and ranks[1]["dp2_buckets"][0] == bk
    assert one_bucket == 1 and n_buckets >= 4 and early == n_buckets - 1, (one_bucket, n_buckets, early)
    assert bk == dp and all(torch.equal(dp_w[k], bk_w[k]) for k in dp_w)
    dp_rel, dp_wd = max(rel(one_steps, dp, 0), rel(one_steps, dp, 1)), wdiff(one_weights, dp_w, one_weights)
    print(f"PP=2 vs 1: step-1 embedding grad {emb_diff:.3g} of its max; losses {pp[0]:.3g} rel, grad norms {pp[1]:.3g};"
          f" weights {pp[2]:.3g}, key bias {pp[3]:.3g}; val_loss {val_rel:.3g}; fp16 PP=2 vs 1: losses {fp16_rel:.3g} rel;"
          f" DP=2 vs 1: metrics {dp_rel:.3g}, weights {dp_wd:.3g}; {n_buckets} buckets, {early} started in the backward")
    assert emb_diff < 4 * 2**-9 and pp[0] < 1e-5 and pp[1] < 1e-3 and pp[2] < 1e-4 and pp[3] < 2e-3 and val_rel < 1e-4
    assert fp16_rel < 1e-4 and dp_rel < 1e-5 and dp_wd < 1e-6


@pytest.mark.slow
def test_bench_gpu_times_and_counts_the_layout():
    """benchmarks/bench_gpu.py --layout both on the CPU: the O2 rows run, and the training
    state is 18 bytes per parameter against the fp32 layout's 16 (bf16 parameter, fp32
    main weight and gradient, two fp32 AdamW moments)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "benchmarks" / "bench_gpu.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rates = bench.main(["--device", "cpu", "--tiny", "--layout", "both", "--no-run", "--reps", "1"])
    assert set(rates) == {"reference", "mega eager", "mega O2 eager"}
    assert all(math.isfinite(r) and r > 0 for r in rates.values()), rates
    fp32, o2 = bench.STATE_BYTES["mega eager"], bench.STATE_BYTES["mega O2 eager"]
    assert o2["grads"] == 0 and o2["main grads"] == o2["main params"] == 2 * o2["params"] == fp32["params"]
    assert o2["total"] / fp32["total"] == pytest.approx(18 / 16)
