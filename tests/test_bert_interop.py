"""Megatron-BERT conversions: transformers' eight MegatronBert* classes (`mega export --to hf`,
`mega import` of their directories), Megatron-LM's legacy layout read by transformers' own
`convert_megatron_bert_checkpoint.py` (run in-process), and NGC's release zip. Every model
is built locally from a tiny config; nothing is downloaded."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import MegatronBertConfig  # noqa: E402

from mega.plugins.checkpoints import huggingface_bert as hfb  # noqa: E402

HEADS, HIDDEN, LAYERS = 4, 32, 2
CLASSES = list(hfb.ARCHITECTURES.values())


def _randomised(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Noise on every parameter: biases and LayerNorms start at 0 / 1, which would hide a
    mapping mistake in them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def _hf_config(vocab: int, arch: str, **extra) -> MegatronBertConfig:
    labels = {"MegatronBertForSequenceClassification": 3, "MegatronBertForTokenClassification": 5,
              "MegatronBertForQuestionAnswering": 2}.get(arch, 2)
    return MegatronBertConfig(vocab_size=vocab, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                              intermediate_size=64, max_position_embeddings=32, hidden_act="gelu", layer_norm_eps=1e-5,
                              hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=labels,
                              is_decoder=arch == "MegatronBertForCausalLM", **extra)


def _hf_model(vocab: int, arch: str, seed: int = 0, **extra):
    torch.manual_seed(seed)
    return _randomised(getattr(transformers, arch)(_hf_config(vocab, arch, **extra)), seed)


def test_qkv_split_and_fuse_are_inverse_and_per_head():
    heads, dim, hidden = 4, 3, 5
    fused = torch.randn(heads * 3 * dim, hidden)
    q, k, v = hfb.split_qkv(fused, heads)
    # row (head h, part t, dim d) of the fused tensor is row h*dim + d of part t
    rows = fused.view(heads, 3, dim, hidden)
    assert torch.equal(q.view(heads, dim, hidden), rows[:, 0]) and torch.equal(v.view(heads, dim, hidden), rows[:, 2])
    assert torch.equal(hfb.fuse_qkv(q, k, v, heads), fused)
    bias = torch.randn(heads * 3 * dim)
    assert torch.equal(hfb.fuse_qkv(*hfb.split_qkv(bias, heads), heads), bias)


@pytest.mark.parametrize("arch", CLASSES)
def test_state_dict_mapping_round_trips_every_class(arch):
    """HF -> mega names -> HF gives every tensor back (vocabulary padded, then cut)."""
    vocab, padded = 100, 128
    model = _hf_model(vocab, arch)
    theirs = model.state_dict()
    name = hfb.MODELS[arch]
    ours = hfb.hf_to_mega(theirs, name, LAYERS, HEADS, padded, vocab, "test")
    assert ours["language_model.embedding.word_embeddings.weight"].shape[0] == padded
    assert not any(".query." in k or ".key." in k for k in ours)
    back = hfb.mega_to_hf(ours, name, LAYERS, HEADS, vocab)
    expected = {k: v for k, v in theirs.items() if not hfb.HF_DERIVED.match(k)}
    assert set(back) == set(expected)
    for k, v in expected.items():
        assert torch.equal(back[k], v), k


def test_unknown_and_untied_tensors_are_refused():
    from mega.errors import CheckpointError

    model = _hf_model(100, "MegatronBertForPreTraining")
    state = dict(model.state_dict())
    with pytest.raises(CheckpointError, match="tensors MegatronBertForMaskedLM does not have.*bert.encoder.layer.2.ln"):
        hfb.hf_to_mega({**state, "bert.encoder.layer.2.ln.weight": torch.ones(HIDDEN)}, "bert_masked_lm", LAYERS,
                       HEADS, 128, 100, "here")
    state["cls.predictions.decoder.weight"] = state["cls.predictions.decoder.weight"] + 1
    with pytest.raises(CheckpointError, match="differs from the word embedding"):
        hfb.hf_to_mega(state, "bert", LAYERS, HEADS, 128, 100, "here")
