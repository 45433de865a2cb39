"""Megatron-BERT against Hugging Face's MegatronBert* classes (the reference), built from
a tiny config with the same weights: every head's outputs at real positions to 1e-5 in
fp32, and the pretraining loss equal to MegatronBertForPreTraining's with its labels.
Also: the Megatron-LM state-dict key names, config errors naming keys, and the kernel's
per-sample loss rule under micro-batching."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

VOCAB, PADDED, H, HEADS, LAYERS, FFN, SEQ, POS = 100, 128, 32, 4, 2, 128, 16, 64


def bert_config(name="bert", **model):
    from mega.config import config_from_dict

    keys = {"name": name, "num_layers": LAYERS, "hidden_size": H, "num_attention_heads": HEADS, "ffn_hidden_size": FFN,
            "seq_length": SEQ, "max_position_embeddings": POS, "make_vocab_size_divisible_by": PADDED,
            "hidden_dropout": 0.0, "attention_dropout": 0.0, "mask_padded_vocab": False}
    keys.update(model)
    return config_from_dict({"model": keys}).model


def bert_model(name="bert", seed=0, **model):
    from mega.plugins.models.bert import TASKS, BertModel

    torch.manual_seed(seed)
    model = BertModel(bert_config(name, **model), VOCAB, TASKS[name]).eval()
    # zero-initialised biases and unit LayerNorms would hide a swapped bias or norm: randomise them
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def hf_state_dict(model) -> dict:
    """Our Megatron-LM names -> Hugging Face MegatronBert names (test-local mapping)."""
    n, hn = HEADS, H // HEADS
    out = {}
    for key, t in model.state_dict().items():
        k = key
        if k.startswith("language_model.embedding."):
            k = k.replace("language_model.embedding.", "bert.embeddings.").replace("tokentype_embeddings", "token_type_embeddings")
        elif k.startswith("language_model.encoder.layers."):
            rest = k[len("language_model.encoder.layers."):]
            i, rest = rest.split(".", 1)
            p = f"bert.encoder.layer.{i}."
            if rest.startswith("self_attention.query_key_value."):
                kind = rest.rsplit(".", 1)[1]
                rows = t.view(n, 3, hn, -1) if kind == "weight" else t.view(n, 3, hn)
                q, kk, v = rows.transpose(0, 1).reshape(3, H, *t.shape[1:])
                for name, part in zip(("query", "key", "value"), (q, kk, v)):
                    out[f"{p}attention.self.{name}.{kind}"] = part
                continue
            k = p + (rest.replace("input_layernorm", "attention.ln").replace("self_attention.dense", "attention.output.dense")
                     .replace("post_attention_layernorm", "ln").replace("mlp.dense_h_to_4h", "intermediate.dense")
                     .replace("mlp.dense_4h_to_h", "output.dense"))
        elif k.startswith("language_model.encoder.final_layernorm."):
            k = k.replace("language_model.encoder.final_layernorm.", "bert.encoder.ln.")
        elif k.startswith("language_model.pooler."):
            k = k.replace("language_model.pooler.", "bert.pooler.")
        elif k.startswith("lm_head."):
            k = (k.replace("lm_head.dense", "cls.predictions.transform.dense")
                 .replace("lm_head.layernorm", "cls.predictions.transform.LayerNorm").replace("lm_head.bias", "cls.predictions.bias"))
        elif k.startswith("binary_head."):
            k = k.replace("binary_head.", "cls.seq_relationship.")
        elif k.startswith(("classification_head.", "multichoice_head.", "token_classification_head.")):
            k = "classifier." + k.split(".", 1)[1]
        elif k.startswith("qa_head."):
            k = "qa_outputs." + k.split(".", 1)[1]
        out[k] = t
    if "cls.predictions.bias" in out:
        out["cls.predictions.decoder.weight"] = out["bert.embeddings.word_embeddings.weight"]
        out["cls.predictions.decoder.bias"] = out["cls.predictions.bias"]
    return out


HF_CLASSES = {
    "bert": "MegatronBertForPreTraining",
    "bert_masked_lm": "MegatronBertForMaskedLM",
    "bert_causal_lm": "MegatronBertForCausalLM",
    "bert_next_sentence": "MegatronBertForNextSentencePrediction",
    "bert_sequence_classification": "MegatronBertForSequenceClassification",
    "bert_multiple_choice": "MegatronBertForMultipleChoice",
    "bert_token_classification": "MegatronBertForTokenClassification",
    "bert_question_answering": "MegatronBertForQuestionAnswering",
}


def hf_model(name, model, num_labels=2):
    cfg = transformers.MegatronBertConfig(
        vocab_size=PADDED, hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=FFN,
        hidden_act="gelu", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_position_embeddings=POS,
        type_vocab_size=2, layer_norm_eps=1e-5, num_labels=num_labels, is_decoder=name == "bert_causal_lm")
    hf = getattr(transformers, HF_CLASSES[name])(cfg).eval()
    missing, unexpected = hf.load_state_dict(hf_state_dict(model), strict=False)
    assert not unexpected, unexpected
    assert all("position_ids" in k for k in missing), missing  # every weight came from ours
    return hf


def batch(b=3, s=SEQ, choices=None, pad=True, seed=1):
    g = torch.Generator().manual_seed(seed)
    shape = (b, choices, s) if choices else (b, s)
    tokens = torch.randint(0, VOCAB, shape, generator=g)
    types = torch.zeros(shape, dtype=torch.long)
    types[..., s // 2:] = 1
    padding = torch.ones(shape, dtype=torch.long)
    if pad:  # each sample a different real length; position 0 always real
        lengths = torch.randint(s // 2, s + 1, shape[:-1], generator=g)
        padding = (torch.arange(s) < lengths.unsqueeze(-1)).long()
    loss_mask = ((torch.rand(shape, generator=g) < 0.3).long() * padding)
    loss_mask[..., 1] = 1
    labels = torch.where(loss_mask.bool(), torch.randint(0, VOCAB, shape, generator=g), torch.full(shape, -1))
    return {"tokens": tokens, "tokentype_ids": types, "padding_mask": padding, "labels": labels, "loss_mask": loss_mask,
            "is_random": torch.randint(0, 2, (b,), generator=g)}


def _close(ours, theirs, real=None):
    if real is not None:  # only real positions are comparable (padded query rows differ by design)
        ours, theirs = ours[real.bool()], theirs[real.bool()]
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["bert", "bert_masked_lm", "bert_next_sentence", "bert_sequence_classification",
                                  "bert_token_classification", "bert_question_answering"])
def test_outputs_equal_hugging_face(name):
    model = bert_model(name)
    hf = hf_model(name, model)
    x = batch()
    ours = model.logits(x)
    with torch.no_grad():
        theirs = hf(input_ids=x["tokens"], attention_mask=x["padding_mask"], token_type_ids=x["tokentype_ids"])
    pad = x["padding_mask"]
    if name == "bert":
        _close(ours["prediction_logits"], theirs.prediction_logits, pad)
        _close(ours["seq_relationship_logits"], theirs.seq_relationship_logits)
    elif name in ("bert_masked_lm", "bert_token_classification"):
        _close(ours["logits"], theirs.logits, pad)
    elif name in ("bert_next_sentence", "bert_sequence_classification"):
        _close(ours["logits"], theirs.logits)
    else:
        _close(ours["start_logits"], theirs.start_logits, pad)
        _close(ours["end_logits"], theirs.end_logits, pad)


def test_multiple_choice_equals_hugging_face():
    model = bert_model("bert_multiple_choice")
    hf = hf_model("bert_multiple_choice", model)
    x = batch(b=2, choices=3)
    with torch.no_grad():
        theirs = hf(input_ids=x["tokens"], attention_mask=x["padding_mask"], token_type_ids=x["tokentype_ids"])
    _close(model.logits(x)["logits"], theirs.logits)
    label = torch.tensor([2, 0])
    out = model.training_loss({**x, "label": label})
    with torch.no_grad():
        ref = hf(input_ids=x["tokens"], attention_mask=x["padding_mask"], token_type_ids=x["tokentype_ids"], labels=label).loss
    assert float(out["sample_loss_sum"]) / 2 == pytest.approx(float(ref), abs=1e-5)


def test_causal_lm_equals_hugging_face():
    model = bert_model("bert_causal_lm")
    hf = hf_model("bert_causal_lm", model)
    g = torch.Generator().manual_seed(4)
    text = torch.randint(0, VOCAB, (2, SEQ + 1), generator=g)
    tokens, labels = text[:, :-1], text[:, 1:]
    loss_mask = torch.ones_like(tokens)
    loss_mask[:, -1] = 0  # Hugging Face shifts inside: its last position has no target
    with torch.no_grad():
        theirs = hf(input_ids=tokens, labels=tokens)
    _close(model.logits({"tokens": tokens})["logits"], theirs.logits)
    out = model.training_loss({"tokens": tokens, "labels": labels, "loss_mask": loss_mask})
    assert float(out["loss_sum"] / loss_mask.sum()) == pytest.approx(float(theirs.loss), abs=1e-5)


def test_pretraining_loss_equals_hugging_face():
    """lm_loss (token mean over loss_mask) + sop_loss (sample mean) = MegatronBertForPreTraining's
    loss with labels -100 where loss_mask is 0 and next_sentence_label = is_random."""
    model = bert_model("bert")
    hf = hf_model("bert", model)
    x = batch(b=4)
    out = model.training_loss(x)
    lm = out["loss_sum"] / x["loss_mask"].sum()
    sop = out["sample_loss_sum"] / 4
    with torch.no_grad():
        ref = hf(input_ids=x["tokens"], attention_mask=x["padding_mask"], token_type_ids=x["tokentype_ids"],
                 labels=torch.where(x["loss_mask"].bool(), x["labels"], -100), next_sentence_label=x["is_random"])
    assert float(lm + sop) == pytest.approx(float(ref.loss), abs=1e-5)
    assert set(out["terms"]) == {"lm_loss"} and set(out["sample_terms"]) == {"sop_loss", "binary_acc"}
    right = (ref.seq_relationship_logits.argmax(-1) == x["is_random"]).sum()
    assert float(out["sample_terms"]["binary_acc"]) == float(right)


def test_downstream_losses_equal_hugging_face():
    x = batch(b=4)
    fwd = {"input_ids": x["tokens"], "attention_mask": x["padding_mask"], "token_type_ids": x["tokentype_ids"]}
    g = torch.Generator().manual_seed(7)
    # sequence classification: classes, regression (num_labels = 1), multi-label (float multi-hot)
    for num_labels, label in ((3, torch.randint(0, 3, (4,), generator=g)), (1, torch.randn(4, generator=g)),
                              (3, (torch.rand(4, 3, generator=g) < 0.5).float())):
        model = bert_model("bert_sequence_classification", num_labels=num_labels)
        hf = hf_model("bert_sequence_classification", model, num_labels)
        out = model.training_loss({**x, "label": label})
        with torch.no_grad():
            ref = hf(**fwd, labels=label).loss
        assert float(out["sample_loss_sum"]) / 4 == pytest.approx(float(ref), abs=1e-5), num_labels
    # token classification: labels where loss_mask, -100 elsewhere for Hugging Face
    model = bert_model("bert_token_classification", num_labels=5)
    hf = hf_model("bert_token_classification", model, 5)
    labels = torch.randint(0, 5, x["tokens"].shape, generator=g)
    out = model.training_loss({**x, "labels": labels})
    with torch.no_grad():
        ref = hf(**fwd, labels=torch.where(x["loss_mask"].bool(), labels, -100)).loss
    assert float(out["loss_sum"] / x["loss_mask"].sum()) == pytest.approx(float(ref), abs=1e-5)
    # question answering
    model = bert_model("bert_question_answering")
    hf = hf_model("bert_question_answering", model)
    start, end = torch.randint(0, SEQ, (4,), generator=g), torch.randint(0, SEQ, (4,), generator=g)
    out = model.training_loss({**x, "start_positions": start, "end_positions": end})
    with torch.no_grad():
        ref = hf(**fwd, start_positions=start, end_positions=end).loss
    assert float(out["sample_loss_sum"]) / 4 == pytest.approx(float(ref), abs=1e-5)


def test_parameter_names_are_megatron_legacy_keys():
    keys = set(bert_model("bert").state_dict())
    for k in ("language_model.embedding.word_embeddings.weight", "language_model.embedding.position_embeddings.weight",
              "language_model.embedding.tokentype_embeddings.weight",
              "language_model.encoder.layers.0.input_layernorm.weight",
              "language_model.encoder.layers.1.self_attention.query_key_value.bias",
              "language_model.encoder.layers.0.self_attention.dense.weight",
              "language_model.encoder.layers.0.post_attention_layernorm.bias",
              "language_model.encoder.layers.0.mlp.dense_h_to_4h.weight",
              "language_model.encoder.layers.0.mlp.dense_4h_to_h.weight",
              "language_model.encoder.final_layernorm.weight", "language_model.pooler.dense.weight",
              "language_model.pooler.dense.bias", "lm_head.dense.weight", "lm_head.dense.bias", "lm_head.layernorm.weight",
              "lm_head.layernorm.bias", "lm_head.bias", "binary_head.weight", "binary_head.bias"):
        assert k in keys, k
    assert bert_model("bert").state_dict()["lm_head.bias"].shape == (PADDED,)
    plain = set(bert_model("bert", add_binary_head=False, num_tokentypes=0).state_dict())
    assert not any(k.startswith(("binary_head", "language_model.pooler")) or "tokentype" in k for k in plain)
    assert set(bert_model("bert_sequence_classification").state_dict()) - keys == {"classification_head.weight",
                                                                                    "classification_head.bias"}
    assert "multichoice_head.weight" in bert_model("bert_multiple_choice").state_dict()
    assert bert_model("bert_question_answering").state_dict()["qa_head.weight"].shape == (2, H)


@pytest.mark.parametrize("keys,named", [
    ({"hidden_size": 30}, "model.hidden_size=30"),
    ({"seq_length": 128}, "model.max_position_embeddings=64"),
    ({"num_tokentypes": -1}, "model.num_tokentypes"),
    ({"masked_lm_prob": 1.5}, "model.masked_lm_prob"),
    ({"lm_head_activation": "relu"}, "model.lm_head_activation"),
])
def test_shape_mistakes_name_the_keys(keys, named):
    from mega.errors import ConfigError

    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        bert_config(**keys).check()


def test_objectives_follow_the_keys():
    from mega.plugins.data.objectives import BertObjective

    obj = bert_config(binary_head="nsp", masked_lm_prob=0.2, max_predictions_per_seq=5).objective()
    assert obj == BertObjective(binary_head="nsp", masked_lm_prob=0.2, max_predictions_per_seq=5)
    assert bert_config(add_binary_head=False).objective().binary_head is None
    assert bert_config("bert_masked_lm").objective().binary_head is None
    assert bert_config("bert_causal_lm").objective().name == "lm"
    assert bert_config("bert_question_answering").objective().name == "question_answering"


def test_micro_batching_keeps_the_token_and_sample_means():
    """The kernel's rule: lm_loss divided by the global batch's predicted tokens, sop_loss by
    its samples; 1, 2 or 4 micro-batches give the loss and gradients of the whole batch."""
    from mega.runtime.pipeline import forward_backward_no_pipelining

    x = batch(b=4)
    results = []
    for n_micro in (1, 2, 4):
        model = bert_model("bert").train()
        micro = [{k: v[i::n_micro] for k, v in x.items()} for i in range(n_micro)]
        loss, terms = forward_backward_no_pipelining(lambda b, h: model.training_loss(b), micro, x["loss_mask"].sum(),
                                                     num_samples=torch.tensor(4.0))
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        results.append((loss, terms, grads))
    (loss0, terms0, grads0) = results[0]
    assert float(loss0) == pytest.approx(float(terms0["lm_loss"] + terms0["sop_loss"]), rel=1e-6)
    for loss, terms, grads in results[1:]:
        torch.testing.assert_close(loss, loss0)
        for k in terms0:
            torch.testing.assert_close(terms[k], terms0[k])
        for k in grads0:
            torch.testing.assert_close(grads[k], grads0[k], rtol=1e-5, atol=1e-7, msg=k)


@pytest.mark.parametrize("name,keys", [("bert", {}), ("bert", {"add_binary_head": False, "num_tokentypes": 0}),
                                       ("bert_causal_lm", {}), ("bert_sequence_classification", {"num_labels": 3}),
                                       ("bert_multiple_choice", {}), ("bert_token_classification", {"num_labels": 5}),
                                       ("bert_question_answering", {}), ("bert_next_sentence", {}),
                                       # NeMo's MLP heads (no pooler under the sequence classifier)
                                       ("bert_sequence_classification", {"num_labels": 3, "classifier_layers": 2}),
                                       ("bert_token_classification", {"num_labels": 5, "classifier_layers": 3}),
                                       ("bert_question_answering", {"classifier_layers": 1})])
def test_memory_estimate_counts_the_built_models_parameters(name, keys):
    """`mega plan`'s parameter count is exactly what BertModel builds, for every head."""
    cfg = bert_config(name, **keys)
    est = cfg.memory_per_rank(VOCAB, 2, 1, 1, "32", "cpu")
    assert est["params"] == est["stages"][0]["params"] == sum(p.numel() for p in bert_model(name, **keys).parameters())
    assert est["stages"][0]["activations"] > 0 and est["flops_per_token"] > 0
    pp2 = cfg.memory_per_rank(VOCAB, 2, 1, 2, "32", "cpu")["stages"]
    assert len(pp2) == 2 and sum(s["params"] for s in pp2) > est["params"]  # + the last stage's word embedding copy


def test_a_classifier_without_loss_tokens_is_a_per_sample_mean_under_micro_batching():
    """No `loss_mask` at all: the loss is the sample mean, whatever the micro-batching."""
    from mega.runtime.pipeline import forward_backward_no_pipelining

    x = batch(b=4)
    x = {k: x[k] for k in ("tokens", "tokentype_ids", "padding_mask")}
    x["label"] = torch.tensor([0, 2, 1, 2])
    losses = []
    for n_micro in (1, 4):
        model = bert_model("bert_sequence_classification", num_labels=3)
        micro = [{k: v[i::n_micro] for k, v in x.items()} for i in range(n_micro)]
        loss, terms = forward_backward_no_pipelining(lambda b, h: model.training_loss(b), micro, torch.tensor(1.0),
                                                     num_samples=torch.tensor(4.0))
        losses.append(loss)
        with torch.no_grad():
            ref = torch.nn.functional.cross_entropy(model.logits(x)["logits"], x["label"])
        assert float(loss) == pytest.approx(float(ref), abs=1e-6)
        assert 0 <= float(terms["cls_acc"]) <= 1
    torch.testing.assert_close(losses[0], losses[1])


@pytest.mark.slow  # ~120 small steps: seconds on an idle machine
def test_binary_head_learns_a_label_it_can_see():
    """The sentence-level path trains: with the label written into segment B (one token, at
    a random position after padding-free [CLS]), the pooler on token 0 of the final
    LayerNorm, the binary head, the kernel's per-sample mean next to the token mean, the
    optimizer's parameter groups and dropout together reach full accuracy. A broken link
    (no gradient to the head, a label misaligned with its sample, the head left out of the
    optimizer) leaves `binary_acc` at chance, as the pretraining runs would."""
    from mega.runtime.pipeline import forward_backward_no_pipelining
    from mega.training.run import param_groups

    torch.manual_seed(0)
    model = bert_model("bert", hidden_dropout=0.1, attention_dropout=0.1).train()
    optimizer = torch.optim.AdamW(param_groups(model, 0.01), lr=2e-3)
    b, s = 32, SEQ
    acc = []
    for _ in range(120):
        label = torch.randint(0, 2, (b,))
        tokens = torch.randint(10, VOCAB, (b, s))
        tokens[:, 0] = 2
        tokens[torch.arange(b), torch.randint(s // 2, s - 2, (b,))] = 5 + label  # the label, in segment B
        padding = (torch.arange(s) < torch.randint(s - 2, s + 1, (b, 1))).long()
        loss_mask = torch.zeros(b, s, dtype=torch.long)
        loss_mask[:, 3:5] = 1
        x = {"tokens": tokens * padding, "tokentype_ids": (torch.arange(s) >= s // 2).long() * padding,
             "padding_mask": padding, "labels": torch.where(loss_mask.bool(), tokens, -1), "loss_mask": loss_mask,
             "is_random": label}
        optimizer.zero_grad()
        _, terms = forward_backward_no_pipelining(lambda mb, h: model.training_loss(mb), [x], loss_mask.sum(),
                                                  num_samples=torch.tensor(float(b)))
        optimizer.step()
        acc.append(float(terms["binary_acc"]))
    assert sum(acc[:10]) / 10 < 0.75 and sum(acc[-10:]) / 10 > 0.95, acc
