"""The Llama options (RoPE, RMSNorm, SwiGLU, grouped-query attention, no biases, an untied
output layer, a sliding window) with the rest of mega: activation recomputation bit for
bit (fp32 and bf16 with megatron_amp_O2, dropout on), sequence parallelism at TP=2 equal
to TP=2 without it and to one process, the chunked loss equal to the unchunked one (TP=1
and TP=2), the SDPA backends, and a training step that traces into one graph for
`trainer.compile`."""
from __future__ import annotations

import pytest
import torch

from mega.config import config_from_dict
from mega.testing import tiny_config
from mega.testing import full_grads, run_ranks

LLAMA = {"name": "llama", "num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "num_query_groups": 2,
         "ffn_hidden_size": 48, "seq_length": 16, "make_vocab_size_divisible_by": 16, "rope_scaling": True,
         "old_context_len": 8, "window_size": [11, 0]}
FULL_UNIFORM_1 = {"activations_checkpoint_granularity": "full", "activations_checkpoint_method": "uniform",
                  "activations_checkpoint_num_layers": 1}
MODES = {"full/uniform/1": FULL_UNIFORM_1, "full/block/1": dict(FULL_UNIFORM_1, activations_checkpoint_method="block"),
         "selective core_attn+mlp": {"activations_checkpoint_granularity": "selective",
                                     "recompute_modules": ["core_attn", "mlp"]}}


def _llama(state=None, **keys):
    from mega.plugins.models.gpt import GPTModel
    from mega.runtime.rng import get_rng_tracker

    tp = state.tp_size if state is not None else 1
    cfg = config_from_dict({"model": {**LLAMA, "tensor_model_parallel_size": tp, **keys}}).model
    torch.manual_seed(0)
    get_rng_tracker().reset(0, state.tp_rank if state is not None else 0, "cpu")
    return GPTModel(cfg, 50).train()


def _batch(step: int = 0):
    g = torch.Generator().manual_seed(1 + step)
    return {"tokens": torch.randint(0, 50, (2, 16), generator=g), "labels": torch.randint(0, 50, (2, 16), generator=g),
            "loss_mask": (torch.rand(2, 16, generator=g) > 0.2).float()}


def _step(state=None, **keys):
    """One forward and backward: (loss, gradients after the sequence-parallel sum, model)."""
    from mega.runtime.tensor_parallel import sum_sequence_parallel_grads

    model = _llama(state, **keys)
    loss = model.training_loss(_batch())["loss_sum"]
    loss.backward()
    if state is not None:
        sum_sequence_parallel_grads(list(model.parameters()), state)
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, model


@pytest.mark.parametrize("mode", list(MODES))
def test_recomputation_is_bit_for_bit_with_the_llama_options(mode):
    """Dropout on (so the recomputed masks must be the originals): the same loss and
    gradients bit for bit, in fp32."""
    dropout = {"hidden_dropout": 0.1, "attention_dropout": 0.1}
    ref_loss, ref, _ = _step(**dropout)
    loss, grads, _ = _step(**dropout, **MODES[mode])
    assert torch.equal(loss, ref_loss)
    assert all(torch.equal(grads[k], ref[k]) for k in ref)


def _train(tmp_path, corpus, plugins, name, model, steps=3):
    """Real training steps of the llama at bf16 with megatron_amp_O2: (loss, grad norm) per step."""
    from mega.training.loop import train_step
    from mega.training.run import build_run
    from mega.training.run_dir import unlock_run_dir

    cfg = tiny_config(tmp_path, corpus, plugins, exp_manager={"name": name},
                      trainer={"precision": "bf16", "accelerator": "cpu", "gradient_clip_val": 0.0},
                      model={**LLAMA, "seq_length": 32, "window_size": [20, 0], "megatron_amp_O2": True,
                             "micro_batch_size": 2, "global_batch_size": 4, "hidden_dropout": 0.1,
                             "attention_dropout": 0.1, **model})
    run = build_run(cfg, plugins)
    try:
        out = []
        for _ in range(steps):
            m = train_step(run)
            run.step += 1
            out.append((float(m["loss"]), float(m["grad_norm"])))
        return out, {k: v.clone() for k, v in run.model_state_dict().items()}
    finally:
        unlock_run_dir(run.run_dir)


@pytest.mark.slow
def test_megatron_amp_o2_trains_and_recomputes_bit_for_bit(tmp_path, corpus, plugins):
    """bf16 with fp32 main weights (megatron_amp_O2): RMSNorm normalises in fp32 and casts
    back, RoPE's cos/sin are cast once per layer; recomputation changes nothing."""
    ref_metrics, ref_weights = _train(tmp_path, corpus, plugins, "none", {})
    assert all(torch.isfinite(torch.tensor(m)).all() for m in ref_metrics)
    for name, keys in MODES.items():
        metrics, weights = _train(tmp_path, corpus, plugins, name.replace("/", "_").replace(" ", "_"), keys)
        assert metrics == ref_metrics, name
        assert all(torch.equal(weights[k], ref_weights[k]) for k in ref_weights), name


def test_chunked_loss_equals_unchunked_with_an_untied_output_layer():
    ref_loss, ref, _ = _step()
    loss, grads, _ = _step(loss_chunk_size=5)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    for name, grad in ref.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_attention_math_equals_auto_with_groups_rope_and_a_window():
    out = {}
    for backend in ("auto", "math"):
        loss, grads, model = _step(attention_backend=backend)
        with torch.no_grad():
            out[backend] = (loss, model.eval()(_batch()["tokens"]), grads)
    torch.testing.assert_close(out["math"][0], out["auto"][0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out["math"][1], out["auto"][1], rtol=1e-5, atol=1e-6)
    for name, grad in out["auto"][2].items():
        torch.testing.assert_close(out["math"][2][name], grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("keys", [{}, {"loss_chunk_size": 8}, {"window_size": None}])
def test_the_training_step_traces_into_one_graph(keys):
    """What trainer.compile needs: no graph break in the llama's training loss."""
    import torch._dynamo

    torch._dynamo.reset()
    model = _llama(**keys)
    explanation = torch._dynamo.explain(lambda b: model.training_loss(b)["loss_sum"])(_batch())
    assert explanation.graph_break_count == 0, [str(r) for r in explanation.break_reasons]
    assert explanation.graph_count == 1


def _tp2(state):
    tp = _step(state)
    sp = _step(state, sequence_parallel=True)
    chunked = _step(state, sequence_parallel=True, loss_chunk_size=8)
    recomputed = _step(state, sequence_parallel=True, **FULL_UNIFORM_1)
    tagged = {n for n, p in sp[2].named_parameters() if getattr(p, "sequence_parallel", False)}
    return tp[:2], sp[:2], chunked[0], recomputed[:2], tagged, full_grads(sp[2], state)


@pytest.mark.slow
def test_sequence_parallelism_at_tp2_equals_tp2_and_one_process():
    """TP=2 with sequence parallelism (RMSNorm's weights tagged for the TP sum; RoPE over
    the whole sequence the QKV linear gathers) equals TP=2 without it and one process; the
    chunked loss and full recomputation under it too."""
    one_loss, _, one_model = _step()
    one = {n: p.grad for n, p in one_model.named_parameters()}
    for (tp_loss, tp_grads), (sp_loss, sp_grads), chunked, (re_loss, re_grads), tagged, full in run_ranks(
            _tp2, world=2, tp=2, timeout=300):
        assert tagged and all("layernorm" in n for n in tagged)  # the RMSNorms (no biases here)
        assert torch.equal(sp_loss, tp_loss) and torch.equal(re_loss, sp_loss)
        assert all(torch.equal(re_grads[k], sp_grads[k]) for k in sp_grads)
        torch.testing.assert_close(chunked, sp_loss, rtol=1e-6, atol=1e-6)
        for name, grad in tp_grads.items():
            torch.testing.assert_close(sp_grads[name], grad, rtol=1e-6, atol=1e-6 * float(grad.abs().max()), msg=name)
        torch.testing.assert_close(sp_loss, one_loss, rtol=1e-5, atol=1e-5)
        for name, grad in one.items():
            torch.testing.assert_close(full[name], grad, rtol=1e-4, atol=1e-5, msg=name)


def test_the_default_gpt_keeps_gpt2s_shape():
    """T15: with no architecture key set, GPT builds what it always did: learned positions,
    LayerNorms with biases, the per-head [heads, 3, head_dim] QKV, a 4h GELU MLP, every bias,
    the output layer tied to the word embedding (no output_layer tensor)."""
    from mega.plugins.models.gpt import GPTModel

    cfg = config_from_dict({"model": {"num_layers": 1, "hidden_size": 32, "num_attention_heads": 4,
                                      "seq_length": 16}}).model
    shapes = {k: list(v.shape) for k, v in GPTModel(cfg, 50).state_dict().items()}
    layer = "language_model.encoder.layers.0."
    assert shapes == {
        "language_model.embedding.word_embeddings.weight": [128, 32],
        "language_model.embedding.position_embeddings.weight": [16, 32],
        layer + "input_layernorm.weight": [32], layer + "input_layernorm.bias": [32],
        layer + "self_attention.query_key_value.weight": [96, 32], layer + "self_attention.query_key_value.bias": [96],
        layer + "self_attention.dense.weight": [32, 32], layer + "self_attention.dense.bias": [32],
        layer + "post_attention_layernorm.weight": [32], layer + "post_attention_layernorm.bias": [32],
        layer + "mlp.dense_h_to_4h.weight": [128, 32], layer + "mlp.dense_h_to_4h.bias": [128],
        layer + "mlp.dense_4h_to_h.weight": [32, 128], layer + "mlp.dense_4h_to_h.bias": [32],
        "language_model.encoder.final_layernorm.weight": [32], "language_model.encoder.final_layernorm.bias": [32],
    }


@pytest.mark.slow
def test_a_compiled_llama_trains_like_an_eager_one(mega_experiment, caplog):
    """trainer.compile=true on CPU (inductor): per-step losses within 1e-4 relative of the
    eager run's, or, where this machine cannot compile, the one-line fallback and equal ones."""
    import logging

    from mega.testing import read_metrics

    kw = dict(trainer={"max_steps": 3, "val_check_interval": 0},
              model={"name": "llama", "num_query_groups": 2, "hidden_dropout": 0.0, "attention_dropout": 0.0})
    eager = mega_experiment.run("exp_manager.name=eager", "trainer.compile=false", **kw)
    with caplog.at_level(logging.WARNING, logger="mega"):
        compiled = mega_experiment.run("exp_manager.name=compiled", "trainer.compile=true", **kw)
    a = [m["loss"] for m in read_metrics(eager.run_dir) if "loss" in m]
    b = [m["loss"] for m in read_metrics(compiled.run_dir) if "loss" in m]
    assert b == pytest.approx(a, rel=1e-4)
    assert compiled.loss_module.fallen_back == any("trainer.compile" in r.getMessage() for r in caplog.records)
    print(f"compiled: {not compiled.loss_module.fallen_back}; eager {a}; compiled {b}")
