"""Activation recomputation against the run without it (docs/parallelism.md, "Activation
memory"; the tensor-parallel and pipeline cases are in tests/parallel/test_sequence_parallel.py):

* every mode (full uniform 1 and 2, full block 1, selective core_attn, core_attn + mlp)
  trains the tiny GPT through the real loop with dropout on to the same losses, gradient
  norms, first-step gradients and final weights, bit for bit, in fp32 and under
  model.megatron_amp_O2 (bf16);
* BERT, the encoder-decoder (T5) and Transformer-XL give the same loss and gradients bit for
  bit in every mode they have;
* a run resumed mid-way with recomputation on continues bit for bit;
* recomputation keeps less (the tensors a forward leaves, counted), and the model parallel
  RNG tracker's forks are re-entrant;
* every bad combination of the keys is a ConfigError naming them, before anything is built;
  trainer.compile leaves a recomputing step eager, saying so.
"""
from __future__ import annotations

import logging

import pytest
import torch

from mega.errors import ConfigError
from mega.testing import tiny_config

FULL_UNIFORM_1 = {"activations_checkpoint_granularity": "full", "activations_checkpoint_method": "uniform",
                  "activations_checkpoint_num_layers": 1}
MODES = {
    "full/uniform/1": FULL_UNIFORM_1,
    "full/uniform/2": dict(FULL_UNIFORM_1, activations_checkpoint_num_layers=2),
    "full/block/1": dict(FULL_UNIFORM_1, activations_checkpoint_method="block"),
    "selective": {"activations_checkpoint_granularity": "selective"},
    "selective core_attn+mlp": {"activations_checkpoint_granularity": "selective", "recompute_modules": ["core_attn", "mlp"]},
}


def _train(tmp_path, corpus, plugins, name: str, model: dict, precision="32", steps=4):
    """`steps` steps of the tiny GPT (3 layers, dropout on) through the real loop: per-step
    (loss, grad norm), the gradients after the first step, the final fp32 weights."""
    from mega.training.loop import train_step
    from mega.training.run import build_run
    from mega.training.run_dir import unlock_run_dir

    cfg = tiny_config(tmp_path, corpus, plugins, exp_manager={"name": name},
                      trainer={"precision": precision, "accelerator": "cpu", "gradient_clip_val": 0.0},
                      model={"num_layers": 3, "megatron_amp_O2": precision != "32", "micro_batch_size": 2,
                             "global_batch_size": 4, **model})
    run = build_run(cfg, plugins)
    try:
        metrics, first = [], None
        for _ in range(steps):
            m = train_step(run)
            run.step += 1
            metrics.append((m["loss"], m["grad_norm"]))
            if first is None:
                first = ([run.main_params.grad_buffer.clone()] if run.main_params is not None
                         else [p.grad.clone() for p in run.model.parameters()])
        return metrics, first, {k: v.clone() for k, v in run.model_state_dict().items()}
    finally:
        unlock_run_dir(run.run_dir)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["32", "bf16"])
def test_every_mode_trains_bit_for_bit_like_no_recomputation(tmp_path, corpus, plugins, precision):
    torch.set_num_threads(1)
    ref = _train(tmp_path, corpus, plugins, "none", {}, precision)
    for name, keys in MODES.items():
        got = _train(tmp_path, corpus, plugins, name.replace("/", "_").replace(" ", "_"), keys, precision)
        assert [tuple(map(float, m)) for m in got[0]] == [tuple(map(float, m)) for m in ref[0]], name
        assert all(torch.equal(a, b) for a, b in zip(got[1], ref[1])), name
        assert got[2].keys() == ref[2].keys() and all(torch.equal(got[2][k], ref[2][k]) for k in ref[2]), name


def _grads(model) -> dict:
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _bert(keys):
    from mega.plugins.models.bert import TASKS, BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16, **keys), 100,
                      TASKS["bert"]).train()
    g = torch.Generator().manual_seed(1)
    tok = torch.randint(0, 100, (2, 16), generator=g)
    padding = torch.ones_like(tok)
    padding[1, 12:] = 0  # a padded sample: the key mask goes through the checkpoint
    batch = {"tokens": tok, "labels": tok, "loss_mask": (torch.rand(2, 16, generator=g) < 0.3).float(),
             "tokentype_ids": torch.zeros_like(tok), "padding_mask": padding, "is_random": torch.tensor([0, 1])}
    out = model.training_loss(batch)
    (out["loss_sum"] + out["sample_loss_sum"]).backward()
    return out["loss_sum"].detach(), _grads(model)


def _t5(keys):
    from mega.plugins.models.encoder_decoder import EncoderDecoderModel, StackConfig, T5Config

    torch.manual_seed(0)
    stack = StackConfig(num_layers=2, hidden_size=32, num_attention_heads=4, **keys)
    model = EncoderDecoderModel(T5Config(encoder=stack, decoder=stack, seq_length=16, seq_length_dec=8), 100).train()
    g = torch.Generator().manual_seed(1)
    batch = {"text_enc": torch.randint(0, 100, (2, 16), generator=g), "enc_mask": torch.ones(2, 16, dtype=torch.long),
             "text_dec": torch.randint(0, 100, (2, 8), generator=g), "labels": torch.randint(0, 100, (2, 8), generator=g),
             "loss_mask": torch.ones(2, 8), "dec_mask": torch.ones(2, 8, dtype=torch.long)}
    out = model.training_loss(batch)
    out["loss_sum"].backward()
    return out["loss_sum"].detach(), _grads(model)


def _txl(keys):
    """Two segments, so the second attends over the first's memory."""
    from mega.plugins.models.transformer_xl import TransformerXLConfig, TransformerXLModel

    torch.manual_seed(0)
    model = TransformerXLModel(TransformerXLConfig(n_layer=3, d_model=32, n_head=4, d_head=8, d_inner=64, seq_length=8,
                                                   mem_len=8, adaptive=False, dropatt=0.1, global_batch_size=2, **keys),
                               100).train()
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(2):
        tok = torch.randint(0, 100, (2, 8), generator=g)
        out = model.training_loss({"tokens": tok, "labels": tok, "loss_mask": torch.ones(2, 8)})
        out["loss_sum"].backward()
        losses.append(out["loss_sum"].detach())
    return torch.stack(losses), _grads(model)


@pytest.mark.parametrize("family,mode", [(f, m) for f in ("bert", "t5") for m in MODES]
                         + [("txl", m) for m in MODES if m.startswith("full")])
@pytest.mark.slow
def test_other_families_recompute_bit_for_bit(family, mode):
    run = {"bert": _bert, "t5": _t5, "txl": _txl}[family]
    ref_loss, ref_grads = run({})
    loss, grads = run(MODES[mode])
    assert torch.equal(loss, ref_loss)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        assert torch.equal(grads[name], ref_grads[name]), name


@pytest.mark.slow
def test_resumed_with_recomputation_continues_bit_for_bit(tmp_path, corpus, plugins):
    """Dropout on, full recomputation: 4 steps, and 2 + a resumed 2, give the same losses."""
    from mega.training.loop import train
    from mega.training.run import build_run
    from mega.training.run_dir import unlock_run_dir
    from mega.testing import read_metrics

    def run(name, max_steps):
        cfg = tiny_config(tmp_path, corpus, plugins, exp_manager={"name": name},
                          trainer={"max_steps": max_steps, "val_check_interval": 0, "accelerator": "cpu"},
                          model=dict(FULL_UNIFORM_1, micro_batch_size=2, global_batch_size=4))
        r = build_run(cfg, plugins)
        try:
            train(r)
        finally:
            unlock_run_dir(r.run_dir)
        return r.run_dir

    whole = run("whole", 4)
    run("parts", 2)
    parts = run("parts", 4)
    loss = lambda d: [m["loss"] for m in read_metrics(d) if "loss" in m]  # noqa: E731
    assert loss(parts)[-2:] == loss(whole)[-2:] and len(loss(whole)) == 4


def test_recomputation_keeps_less():
    """The tensors one forward leaves for the backward, counted: none > selective > full."""
    from mega.plugins.models.gpt import GPTConfig, GPTModel
    from mega.runtime.tensor_bytes import TensorBytes

    kept = {}
    for name, keys in [("none", {})] + list(MODES.items()):
        torch.manual_seed(0)
        model = GPTModel(GPTConfig(num_layers=3, hidden_size=32, num_attention_heads=4, seq_length=32, **keys), 64).train()
        tok = torch.randint(0, 64, (2, 32))
        with TensorBytes() as counted:
            loss = model.training_loss({"tokens": tok, "labels": tok, "loss_mask": torch.ones(2, 32)})["loss_sum"]
            kept[name] = counted.live
        del loss
    assert kept["none"] > kept["selective"] > kept["selective core_attn+mlp"] > kept["full/uniform/1"] > kept["full/uniform/2"]
    assert kept["none"] > kept["full/block/1"] > kept["full/uniform/1"]


def test_nothing_is_recomputed_in_eval_or_without_grad():
    from mega.plugins.models.gpt import GPTConfig, GPTModel

    model = GPTModel(GPTConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16, **FULL_UNIFORM_1), 64)
    tok = torch.randint(0, 64, (1, 16))
    calls = []
    import mega.runtime.recompute as recompute

    real = recompute.checkpoint
    recompute.checkpoint = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        with torch.no_grad():
            model.train().training_loss({"tokens": tok, "labels": tok, "loss_mask": torch.ones(1, 16)})
        model.eval()(tok)
        assert calls == []
        model.train().training_loss({"tokens": tok, "labels": tok, "loss_mask": torch.ones(1, 16)})
        assert len(calls) == 2  # one chunk of one layer each
    finally:
        recompute.checkpoint = real


def test_rng_tracker_fork_is_reentrant_and_restorable():
    from mega.runtime.rng import RNGTracker

    tracker = RNGTracker()
    tracker.reset(7, 0, "cpu")
    with tracker.fork():
        a = torch.rand(3)
        with tracker.fork():  # the same stream goes on, not restarted
            b = torch.rand(3)
    fresh = RNGTracker()
    fresh.reset(7, 0, "cpu")
    with fresh.fork():
        ref = torch.rand(6)
    assert torch.equal(torch.cat([a, b]), ref)
    snap = fresh.snapshot()
    with fresh.fork():
        c = torch.rand(3)
    with fresh.restore(snap), fresh.fork():
        assert torch.equal(torch.rand(3), c)  # the masks of the snapshot's forward
    with fresh.fork():
        assert not torch.equal(torch.rand(3), c)  # and the stream went on from where it was


def _check(**keys):
    from mega.config import config_from_dict

    config_from_dict({"model": {"num_layers": 4, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 16,
                                **keys}}).model.check(None)


@pytest.mark.parametrize("keys,match", [
    ({"activations_checkpoint_granularity": "full"}, r"model.activations_checkpoint_granularity = \"full\" needs model.activations_checkpoint_method"),
    ({"activations_checkpoint_granularity": "full", "activations_checkpoint_method": "uniform"}, "model.activations_checkpoint_num_layers=None"),
    (dict(FULL_UNIFORM_1, activations_checkpoint_num_layers=5), r"activations_checkpoint_num_layers=5.*\(4\)"),
    (dict(FULL_UNIFORM_1, activations_checkpoint_num_layers=3, pipeline_model_parallel_size=2), r"num_layers=3.*\(2\)"),
    (dict(FULL_UNIFORM_1, activations_checkpoint_num_layers=0), "activations_checkpoint_num_layers=0"),
    ({"activations_checkpoint_granularity": "selective", "activations_checkpoint_method": "uniform"}, "activations_checkpoint_method"),
    ({"activations_checkpoint_granularity": "selective", "activations_checkpoint_num_layers": 1}, "activations_checkpoint_num_layers"),
    ({"activations_checkpoint_granularity": "selective", "recompute_modules": ["moe"]}, "recompute_modules: 'moe' is a Megatron module"),
    ({"activations_checkpoint_granularity": "selective", "recompute_modules": ["attention"]}, "recompute_modules: 'attention' is unknown"),
    ({"activations_checkpoint_granularity": "selective", "recompute_modules": []}, "recompute_modules is empty"),
    ({"distribute_saved_activations": True}, "model.distribute_saved_activations"),
    ({"sequence_parallel": True}, "model.sequence_parallel = true needs tensor parallelism"),
    ({"sequence_parallel": True, "tensor_model_parallel_size": 2, "seq_length": 15}, "model.seq_length=15 is not divisible by model.tensor_model_parallel_size=2"),
])
def test_bad_combinations_are_config_errors_naming_the_keys(keys, match):
    with pytest.raises(ConfigError, match=match):
        _check(**keys)


def test_method_without_granularity_is_ignored_as_in_nemo():
    """NeMo's shipped configs carry activations_checkpoint_method: block with the granularity unset."""
    _check(activations_checkpoint_method="block", activations_checkpoint_num_layers=0)


def test_other_families_refuse_what_they_cannot_do():
    from mega.config import config_from_dict

    def check(model):
        config_from_dict({"model": model}).model.check(None)

    with pytest.raises(ConfigError, match="model.activations_checkpoint_granularity = \"selective\": this model"):
        check({"name": "transformer_xl", "global_batch_size": 2, "activations_checkpoint_granularity": "selective"})
    with pytest.raises(ConfigError, match="model.sequence_parallel = true: transformer_xl"):
        check({"name": "transformer_xl", "global_batch_size": 2, "sequence_parallel": True})
    with pytest.raises(ConfigError, match=r"model.decoder.activations_checkpoint_granularity = \"full\" needs"):
        check({"name": "t5", "decoder": {"activations_checkpoint_granularity": "full"}})
    with pytest.raises(ConfigError, match="model.seq_length_dec=7 is not divisible"):
        check({"name": "bart", "seq_length": 16, "seq_length_dec": 7, "tensor_model_parallel_size": 2,
               "sequence_parallel": True, "encoder": {"num_attention_heads": 8}, "decoder": {"num_attention_heads": 8}})
    with pytest.raises(ConfigError, match="perceiver"):
        check({"name": "t5", "tensor_model_parallel_size": 2, "sequence_parallel": True, "encoder": {"arch": "perceiver"}})
    with pytest.raises(ConfigError, match="model.seq_length=15 is not divisible"):
        check({"name": "bert", "seq_length": 15, "tensor_model_parallel_size": 2, "sequence_parallel": True})


def test_compile_leaves_a_recomputing_step_eager(tmp_path, corpus, plugins, caplog):
    from mega.runtime.compile import CompiledStep
    from mega.training.run import build_run
    from mega.training.run_dir import unlock_run_dir

    cfg = tiny_config(tmp_path, corpus, plugins, trainer={"compile": True, "accelerator": "cpu"}, model=FULL_UNIFORM_1)
    with caplog.at_level(logging.INFO, logger="mega"):
        run = build_run(cfg, plugins)
    unlock_run_dir(run.run_dir)
    assert not isinstance(run.loss_module, CompiledStep)
    assert "trainer.compile: not applied with model.activations_checkpoint_granularity" in caplog.text
