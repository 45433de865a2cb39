"""`model.megatron_amp_O2` (bf16 parameters, fp32 main weights, fp32 gradient accumulation)
against references: a float64 transcription of AdamW on the fp32 sum of the bf16 model's
micro-batch gradients; the fp32 sum against bf16 accumulation; resumed == uninterrupted;
DP=2 and TP=2 against one process; the loss curve against fp32 training."""
from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tomli_w
import torch

from mega.errors import ConfigError
from mega.plugin_manager import load_plugins
from mega.testing import read_metrics, tiny_config, tiny_raw
from mega.training.batches import load_micro_batches, micro_batch_positions
from mega.training.loop import _losses, _num_tokens, train, train_step
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


def test_a_model_that_needs_autocast_fails_with_a_config_error(tmp_path, corpus, plugins):
    """Transformer-XL's fp32 sinusoid buffer meets its bf16 weights outside autocast: the
    first step names the key instead of a bare dtype error."""
    from tests.test_txl_training import txl_config

    cfg = txl_config(tmp_path, corpus, plugins, ["trainer.precision=bf16", "model.megatron_amp_O2=true"])
    with pytest.raises(ConfigError, match="model.megatron_amp_O2"):
        train(build_run(cfg, plugins))


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


def _mega(args, tmp_path, timeout=240):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RANK", None)
    return subprocess.run([sys.executable, "-m", "mega", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=tmp_path, env=env)


def _exp(tmp_path, corpus, **model) -> Path:
    raw = tiny_raw(tmp_path, corpus, trainer={"max_steps": 4, "val_check_interval": 2, "accelerator": "cpu",
                                              "precision": "bf16"},
                   model={"megatron_amp_O2": True, **NO_DROPOUT, **model})
    path = tmp_path / "exp.toml"
    path.write_text(tomli_w.dumps(raw))
    return path


def _full_weights(run_dir: Path) -> dict:
    from mega.runtime.sharding import merge_shards

    ckpt = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    folders = sorted(ckpt.glob("mp_rank_*")) or [ckpt]
    states = [torch.load(f / "model.pt", weights_only=True) for f in folders]
    if len(states) == 1:
        return states[0]
    return merge_shards(states, torch.load(folders[0] / "sharding.pt", weights_only=True))


def _compare(tmp_path, a_name, b_name, loss_rel, weight_atol):
    a, b = read_metrics(tmp_path / "results" / a_name), read_metrics(tmp_path / "results" / b_name)
    assert [m["step"] for m in a] == [m["step"] for m in b]
    worst = 0.0
    for x, y in zip(a, b):
        for key in ("loss", "val_loss", "grad_norm"):
            if key in x:
                worst = max(worst, abs(y[key] - x[key]) / abs(x[key]))
    wa, wb = _full_weights(tmp_path / "results" / a_name), _full_weights(tmp_path / "results" / b_name)
    assert wa.keys() == wb.keys()
    wdiff = max(float((wa[k].double() - wb[k].double()).abs().max()) for k in wa)
    assert all(v.dtype == torch.float32 for v in wb.values() if v.is_floating_point())
    assert worst < loss_rel and wdiff < weight_atol, (worst, wdiff)
    return worst, wdiff


STEPS = 4
LAYOUT = {"micro_batch_size": 2, "global_batch_size": 8}  # 4 micro-batches a step (2 per replica at DP=2)


def _parallel_config(d, corpus, name, *overrides, devices=1, **model):
    from mega.plugin_manager import load_plugins

    plugins = load_plugins()
    cfg = tiny_config(d, corpus, plugins, [f"exp_manager.name={name}", *overrides],
                      model={"megatron_amp_O2": True, **NO_DROPOUT, **LAYOUT, **model},
                      trainer={"precision": "bf16", "accelerator": "cpu", "devices": devices, "max_steps": STEPS,
                               "val_check_interval": 0})
    return cfg, plugins


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

    state = run.model_state_dict()
    return to_global(state, sharding_of(run.model, run.parallel)), state.get("word_embeddings_for_head.weight")


def _parallel_runs(state, d, corpus):
    """One launch of 2 gloo workers, several runs in turn (each builds its own groups):
    PP=2 in bf16; PP=2 in fp16 with an overflow only the last stage sees at step 2; DP=2
    with one all-reduce, and with small buckets and an unused parameter."""
    from mega.runtime.parallel import current

    out = {}
    cfg, plugins = _parallel_config(d, corpus, "pp2", devices=2, pipeline_model_parallel_size=2)
    run = build_run(cfg, plugins)
    out["pp2"] = _train_steps(run), _global_weights(run)
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
    """One launch of 2 workers (gloo) against one process, 4 steps of 4 micro-batches:

    * PP=2: the hidden states travel between stages in bf16, the tied word embedding's
      fp32 main gradients are summed over the two stages, clipping is global (the grad
      norm ~1.8 is clipped to 1.0). One process sums the embedding's two bf16 gradients
      of a micro-batch in bf16 inside autograd before they reach fp32, two stages sum
      them in fp32: the only difference, bf16 rounding noise in one tensor's gradient.
      Measured: losses within 3e-7 relative... (see the print); weights within lr.
    * PP=2, fp16: an inf only the last stage sees makes both stages skip the step.
    * DP=2 with 4096-element buckets started during the backward equals one all-reduce
      after it bit for bit (a sum of two addends is the same in any order), with an
      unused parameter whose bucket (the last) starts after the backward; against one
      process the fp32 sums differ in order only (measured 1.4e-4 relative, weights
      4.8e-4: AdamW turns the key bias's bf16 noise into steps of up to lr)."""
    from tests.multiproc import run_ranks

    cfg, plugins = _parallel_config(tmp_path, corpus, "one")
    one = build_run(cfg, plugins)
    one_steps, one_weights = _train_steps(one), one.model_state_dict()
    cfg, plugins = _parallel_config(tmp_path, corpus, "one_fp16", "trainer.precision=16",
                                    "model.native_amp_init_scale=65536")
    one_fp16 = _train_steps(build_run(cfg, plugins), 3, overflow_at=1)

    ranks = run_ranks(_parallel_runs, world=2, args=(tmp_path, corpus), timeout=400)

    def rel(a, b):
        return max(abs(x - y) / abs(x) for sa, sb in zip(a, b) for x, y in zip(sa[:2], sb[:2]))

    def wdiff(a, b):
        return max(float((a[k].double() - b[k].double()).abs().max()) for k in b)

    # PP=2 vs PP=1
    (steps0, (w0, _)), (steps1, (w1, head)) = ranks[0]["pp2"], ranks[1]["pp2"]
    assert steps0 == steps1 and all(s[1] > 1.0 for s in one_steps)  # every stage logs the same; clipping took part
    pp_weights = {**w0, **w1}
    assert pp_weights.keys() == one_weights.keys() and torch.equal(head, w0["language_model.embedding.word_embeddings.weight"])
    assert all(v.dtype == torch.float32 for v in pp_weights.values() if v.is_floating_point())
    pp_rel, pp_w = rel(one_steps, steps0), wdiff(one_weights, pp_weights)
    # PP=2 fp16 with a one-stage overflow vs one process with the same overflow
    assert [s[2] for s in ranks[0]["pp2_fp16"]] == [s[2] for s in ranks[1]["pp2_fp16"]] == [0.0, 1.0, 0.0]
    fp16_rel = rel(one_fp16, ranks[0]["pp2_fp16"])
    # DP=2: buckets vs one all-reduce vs one process
    (dp, dp_w, one_bucket, _), (bk, bk_w, n_buckets, early) = ranks[0]["dp2"], ranks[0]["dp2_buckets"]
    assert ranks[1]["dp2"][0] == dp and ranks[1]["dp2_buckets"][0] == bk
    assert one_bucket == 1 and n_buckets >= 4 and early == n_buckets - 1, (one_bucket, n_buckets, early)
    assert bk == dp and all(torch.equal(dp_w[k], bk_w[k]) for k in dp_w)
    dp_rel, dp_wd = rel(one_steps, dp), wdiff(one_weights, {k: v for k, v in dp_w.items() if k != "unused"})
    print(f"PP=2 vs 1: metrics {pp_rel:.3g} rel, weights {pp_w:.3g}; fp16 PP=2 vs 1: {fp16_rel:.3g} rel;"
          f" DP=2 vs 1: metrics {dp_rel:.3g}, weights {dp_wd:.3g}; {n_buckets} buckets, {early} started in the backward")
    assert pp_rel < 1e-3 and pp_w < 2e-3 and fp16_rel < 1e-3 and dp_rel < 1e-3 and dp_wd < 2e-3


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
