"""The GPT model against references: our loss equals the cross-entropy formula, the
output layer is the word embedding, cached decoding equals full recomputation, and the
state-dict names are Megatron-LM's."""
from __future__ import annotations

import pytest
import torch

from mega.config import config_from_dict
from mega.errors import ConfigError
from mega.inference import _filter_logits, generate
from mega.plugins.models.gpt import GPTModel


def _model(plugins, vocab=50, **overrides):
    model_cfg = {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 16,
                 "make_vocab_size_divisible_by": 16, "hidden_dropout": 0.0, "attention_dropout": 0.0, **overrides}
    cfg = config_from_dict({"model": model_cfg}, plugins=plugins).model
    torch.manual_seed(0)
    return GPTModel(cfg, vocab).eval()


@pytest.mark.parametrize("mask_padded_vocab", [True, False])
def test_loss_equals_the_cross_entropy_formula(plugins, mask_padded_vocab):
    """-log p(label) with the softmax over the tokenizer's 50 ids (the 14 padded ids of the
    64 left out), or over all 64 with model.mask_padded_vocab = false (Megatron-LM's)."""
    model = _model(plugins, mask_padded_vocab=mask_padded_vocab)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 50, (3, 16), generator=g)
    labels = torch.randint(0, 50, (3, 16), generator=g)
    mask = (torch.rand(3, 16, generator=g) > 0.3).float()
    logits = model(tokens).double()
    assert logits.shape[-1] == 64
    softmax_over = logits[..., :50] if mask_padded_vocab else logits
    reference = -(softmax_over.log_softmax(-1).gather(-1, labels[..., None])[..., 0])  # -log p(label)
    ours = model.compute_language_model_loss(labels, model(tokens).transpose(0, 1))  # megatron-core's [s, b, V]
    assert ours.shape == (3, 16)
    torch.testing.assert_close(ours.double(), reference, rtol=1e-6, atol=1e-6)
    assert torch.equal(model.token_losses(labels, model(tokens)), ours)
    with pytest.raises(ValueError, match=r"megatron-core's layout is sequence-first, \[seq, batch, vocab\] = \[16, 3, vocab\]"):
        model.compute_language_model_loss(labels, model(tokens))  # batch-first logits: refused, not silently wrong
    out = model.training_loss({"tokens": tokens, "labels": labels, "loss_mask": mask})
    torch.testing.assert_close(out["loss_sum"].double(), (reference * mask).sum(), rtol=1e-6, atol=1e-6)


def test_output_layer_is_the_tied_word_embedding(plugins):
    model = _model(plugins)
    w = model.shared_embedding_or_output_weight()
    assert w is model.language_model.embedding.word_embeddings.weight
    assert w.shape == (64, 32)  # 50 padded to a multiple of 16
    with torch.no_grad():
        w.zero_()
    assert torch.count_nonzero(model(torch.zeros(1, 16, dtype=torch.long))) == 0


def test_state_dict_uses_megatron_names(plugins):
    keys = set(_model(plugins).state_dict())
    for k in ("language_model.embedding.word_embeddings.weight", "language_model.embedding.position_embeddings.weight",
              "language_model.encoder.layers.0.input_layernorm.weight",
              "language_model.encoder.layers.1.self_attention.query_key_value.weight",
              "language_model.encoder.layers.1.self_attention.dense.bias",
              "language_model.encoder.layers.0.post_attention_layernorm.bias",
              "language_model.encoder.layers.0.mlp.dense_h_to_4h.weight",
              "language_model.encoder.layers.0.mlp.dense_4h_to_h.weight",
              "language_model.encoder.final_layernorm.weight"):
        assert k in keys
    assert not any("output_layer" in k or "lm_head" in k for k in keys)


def test_qkv_rows_are_per_head_q_k_v(plugins):
    """checkpoint_version >= 2.0 layout: rows [num_heads, 3, head_dim]."""
    model = _model(plugins)
    attn = model.language_model.encoder.layers[0].self_attention
    with torch.no_grad():
        attn.query_key_value.weight.zero_()
        attn.query_key_value.bias.copy_(torch.arange(96.0))
    x = torch.zeros(1, 1, 32)
    qkv = attn.query_key_value(x).view(1, 1, 4, 3, 8)
    assert qkv[0, 0, 1, 0].tolist() == list(range(24, 32))  # head 1's query rows follow head 0's q, k, v


@pytest.mark.slow
def test_cached_decoding_equals_full_recomputation(plugins):
    model = _model(plugins)
    tokens = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(2))
    full = model(tokens)
    cache = model.new_kv_cache(2, 12)
    parts = [model(tokens[:, :5], cache=cache)] + [model(tokens[:, i:i + 1], cache=cache) for i in range(5, 9)]
    parts.append(model(tokens[:, 9:], cache=cache))  # several new tokens at once, after a cache
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)
    prompt = tokens[0, :4].tolist()
    assert generate(model, prompt, 10, greedy=True) == generate(model, prompt, 10, greedy=True, use_cache=False)
    s1 = generate(model, prompt, 8, top_k=5, top_p=0.9, seed=3)
    assert s1 == generate(model, prompt, 8, top_k=5, top_p=0.9, seed=3, use_cache=False)
    assert all(t < 50 for t in s1)  # never a padding id


def test_generation_never_picks_a_padded_id(plugins):
    """The padded logits (ids 50..63 of 64) made to dominate: greedy and sampled tokens
    are still real ids."""
    model = _model(plugins)
    forward = model.forward

    def padding_wins(*args, **kwargs):
        logits = forward(*args, **kwargs).clone()
        logits[..., 50:] += 1e4
        return logits

    model.forward = padding_wins
    assert int(model(torch.tensor([[1, 2, 3]]))[0, -1].argmax()) >= 50
    for kwargs in ({"greedy": True}, {"seed": 1}, {"seed": 2, "top_k": 3}, {"seed": 3, "top_p": 0.5}):
        out = generate(model, [1, 2, 3], 8, **kwargs)
        assert out and all(t < 50 for t in out), kwargs


def test_generation_stops_at_max_positions_and_eos(plugins):
    model = _model(plugins)
    out = generate(model, [1, 2, 3], 100, greedy=True)
    assert len(out) == 16 - 3
    first = out[0]
    assert generate(model, [1, 2, 3], 100, greedy=True, eos_id=first) == [first]
    with pytest.raises(ValueError, match="holds 16 positions"):
        generate(model, list(range(16)), 1)


def test_top_k_and_top_p_filters():
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0])
    assert torch.isfinite(_filter_logits(logits, 2, 1.0)).tolist() == [True, True, False, False]
    p = logits.softmax(-1)  # [0.64, 0.24, 0.09, 0.03]
    assert torch.isfinite(_filter_logits(logits, 0, 0.5)).tolist() == [True, False, False, False]
    assert torch.isfinite(_filter_logits(logits, 0, float(p[0] + 0.01))).tolist() == [True, True, False, False]


def test_flops_per_token_formula(plugins):
    m = _model(plugins, num_layers=3, hidden_size=64, num_attention_heads=4, seq_length=16)
    h, L, s, V = 64, 3, 16, 64
    assert m.flops_per_token(s) == 6 * (L * 12 * h * h + V * h) + 12 * L * h * s


def test_positions_past_the_table_are_an_error(plugins):
    with pytest.raises(ValueError, match="max_position_embeddings"):
        _model(plugins)(torch.zeros(1, 17, dtype=torch.long))


def test_activation_key_selects_exact_or_tanh_gelu():
    """`activation = "gelu_tanh"` is GPT-2's gelu_new / Megatron's fused bias-GELU; the
    default is the exact erf GELU. Checked against the formulas on one MLP."""
    import math

    from mega.plugins.models.transformer import MLP, BlockConfig

    x = torch.randn(3, 8)
    for activation, formula in [
        ("gelu", lambda t: 0.5 * t * (1 + torch.erf(t / math.sqrt(2)))),
        ("gelu_tanh", lambda t: 0.5 * t * (1 + torch.tanh(math.sqrt(2 / math.pi) * (t + 0.044715 * t**3)))),
    ]:
        mlp = MLP(BlockConfig(num_layers=1, hidden_size=8, num_attention_heads=1, activation=activation))
        expected = mlp.dense_4h_to_h(formula(mlp.dense_h_to_4h(x)))
        torch.testing.assert_close(mlp(x), expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(ConfigError, match="model.activation: expected one of 'gelu', 'gelu_tanh', 'swiglu', got 'relu'"):
        from mega.plugins.models.transformer import check_shape

        check_shape(BlockConfig(num_layers=1, hidden_size=8, num_attention_heads=1, activation="relu"))
