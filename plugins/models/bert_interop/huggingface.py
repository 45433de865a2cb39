"""Megatron-BERT as Hugging Face transformers' `MegatronBert*` classes (`model_type =
"megatron-bert"`): config.json and the state dict, both ways.

transformers' MegatronBert is Megatron-LM's pre-LayerNorm BERT, so the mapping is exact,
name for name (`N` a layer):

    language_model.embedding.word_embeddings          bert.embeddings.word_embeddings (and the tied decoder)
    language_model.embedding.position_embeddings      bert.embeddings.position_embeddings
    language_model.embedding.tokentype_embeddings     bert.embeddings.token_type_embeddings
    ...layers.N.input_layernorm                       bert.encoder.layer.N.attention.ln
    ...layers.N.self_attention.query_key_value        ...attention.self.query / key / value
    ...layers.N.self_attention.dense                  ...attention.output.dense
    ...layers.N.post_attention_layernorm              bert.encoder.layer.N.ln
    ...layers.N.mlp.dense_h_to_4h / dense_4h_to_h     ...intermediate.dense / output.dense
    language_model.encoder.final_layernorm            bert.encoder.ln
    language_model.pooler.dense                       bert.pooler.dense
    lm_head.dense / layernorm / bias                  cls.predictions.transform.dense / LayerNorm, cls.predictions.bias
    binary_head                                       cls.seq_relationship
    the classifier of a downstream head               classifier (qa_outputs for question answering)

mega's fused QKV rows are per head ([heads, 3, head_dim], Megatron's layout since
checkpoint_version 2.0); HF keeps three Linear layers whose rows are head-major, so the
split is a view, no arithmetic. Both sides store Linear weights [out, in]: no transposes.
The word embedding and the LM-head bias are cut to the tokenizer's vocabulary on export
and padded (zeros: never predicted) to mega's vocabulary rule on import. HF's config gets
the run's LayerNorm epsilon (Megatron's 1e-5, where HF's default is 1e-12), its
activation, dropouts and, for classifier heads, `num_labels` / `id2label`. The tokenizer
is the tokenizer's own converter's (mega.plugins.tokenizers.wordpiece_interop: `vocab.txt`
with `do_lower_case`).
"""
from __future__ import annotations

import logging
import re
from typing import Dict, Mapping, Tuple

import torch

from mega.errors import CheckpointError
from mega.runtime.sharding import fit

log = logging.getLogger("mega.checkpoints.huggingface")

MODEL_TYPE = "megatron-bert"
# mega model name <-> the transformers class it is written as
ARCHITECTURES = {
    "bert": "MegatronBertForPreTraining",
    "bert_masked_lm": "MegatronBertForMaskedLM",
    "bert_causal_lm": "MegatronBertForCausalLM",
    "bert_next_sentence": "MegatronBertForNextSentencePrediction",
    "bert_sequence_classification": "MegatronBertForSequenceClassification",
    "bert_multiple_choice": "MegatronBertForMultipleChoice",
    "bert_token_classification": "MegatronBertForTokenClassification",
    "bert_question_answering": "MegatronBertForQuestionAnswering",
}
MODELS = {v: k for k, v in ARCHITECTURES.items()}
# transformers' hidden_act <-> mega's model.activation
ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh"}
EXPORT_ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_new"}
# the downstream heads' classifier: HF prefix, by transformers class
CLASSIFIER = {"MegatronBertForSequenceClassification": "classifier", "MegatronBertForMultipleChoice": "classifier",
              "MegatronBertForTokenClassification": "classifier", "MegatronBertForQuestionAnswering": "qa_outputs"}
# the classifier's mega name in each head model (Megatron-LM's names where it has the head)
HEAD_NAMES = {"bert_sequence_classification": "classification_head", "bert_multiple_choice": "multichoice_head",
              "bert_token_classification": "token_classification_head", "bert_question_answering": "qa_head"}

WORD = "language_model.embedding.word_embeddings.weight"
LM_BIAS = "lm_head.bias"
LAYER = "language_model.encoder.layers"
QKV = "self_attention.query_key_value"
# mega -> HF, outside the layers
TOP = {
    "language_model.embedding.position_embeddings.weight": "bert.embeddings.position_embeddings.weight",
    "language_model.embedding.tokentype_embeddings.weight": "bert.embeddings.token_type_embeddings.weight",
    "language_model.encoder.final_layernorm.weight": "bert.encoder.ln.weight",
    "language_model.encoder.final_layernorm.bias": "bert.encoder.ln.bias",
    "language_model.pooler.dense.weight": "bert.pooler.dense.weight",
    "language_model.pooler.dense.bias": "bert.pooler.dense.bias",
    "lm_head.dense.weight": "cls.predictions.transform.dense.weight",
    "lm_head.dense.bias": "cls.predictions.transform.dense.bias",
    "lm_head.layernorm.weight": "cls.predictions.transform.LayerNorm.weight",
    "lm_head.layernorm.bias": "cls.predictions.transform.LayerNorm.bias",
    "binary_head.weight": "cls.seq_relationship.weight",
    "binary_head.bias": "cls.seq_relationship.bias",
}
# mega -> HF inside layer N (the fused QKV apart)
LAYER_KEYS = {
    "input_layernorm": "attention.ln",
    "self_attention.dense": "attention.output.dense",
    "post_attention_layernorm": "ln",
    "mlp.dense_h_to_4h": "intermediate.dense",
    "mlp.dense_4h_to_h": "output.dense",
}
# HF tensors that are not parameters of their own: the tied decoder (weight and its bias
# alias) and the position-id buffer older transformers saved
HF_DERIVED = re.compile(r"^(cls\.predictions\.decoder\.(weight|bias)|bert\.embeddings\.position_ids)$")


# --- the fused QKV ----------------------------------------------------------------------------


def split_qkv(t: torch.Tensor, heads: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mega's fused rows [heads, 3, head_dim] -> HF's query, key, value (rows head-major)."""
    rest = t.shape[1:]
    parts = t.reshape(heads, 3, -1, *rest)
    return tuple(parts[:, i].reshape(-1, *rest).contiguous() for i in range(3))


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    rest = q.shape[1:]
    per_head = [x.reshape(heads, -1, *rest) for x in (q, k, v)]
    return torch.stack(per_head, dim=1).reshape(-1, *rest).contiguous()


# --- state dicts ----------------------------------------------------------------------------


def _head_map(model_name: str) -> Dict[str, str]:
    """mega -> HF names of a head model's classifier."""
    arch = ARCHITECTURES[model_name]
    if arch not in CLASSIFIER:
        return {}
    mine, theirs = HEAD_NAMES[model_name], CLASSIFIER[arch]
    return {f"{mine}.weight": f"{theirs}.weight", f"{mine}.bias": f"{theirs}.bias"}


def architecture(mc) -> str:
    """The transformers class a mega BERT config is written as (`bert` without its binary
    head is a masked LM: it has neither pooler nor binary head)."""
    if mc.name == "bert" and not getattr(mc, "add_binary_head", True):
        return "MegatronBertForMaskedLM"
    return ARCHITECTURES[mc.name]


def mega_to_hf(state: Mapping[str, torch.Tensor], model_name: str, num_layers: int, heads: int,
               vocab: int) -> Dict[str, torch.Tensor]:
    """mega's BERT tensors (one process) -> the transformers class's, the word embedding
    and the LM-head bias cut to the tokenizer's `vocab` (the decoder is tied, so not
    written). Every mega tensor must map: an unknown one is refused by name."""
    names = {**TOP, **_head_map(model_name)}
    out: Dict[str, torch.Tensor] = {}
    unknown = []
    for name, t in state.items():
        m = re.fullmatch(rf"{re.escape(LAYER)}\.(\d+)\.(.+)\.(weight|bias)", name)
        if name == WORD:
            out["bert.embeddings.word_embeddings.weight"] = t[:vocab]
        elif name == LM_BIAS:
            out["cls.predictions.bias"] = t[:vocab]
        elif name in names:
            out[names[name]] = t
        elif m and m.group(2) == QKV:
            prefix = f"bert.encoder.layer.{m.group(1)}.attention.self"
            for part, x in zip(("query", "key", "value"), split_qkv(t, heads)):
                out[f"{prefix}.{part}.{m.group(3)}"] = x
        elif m and m.group(2) in LAYER_KEYS and int(m.group(1)) < num_layers:
            out[f"bert.encoder.layer.{m.group(1)}.{LAYER_KEYS[m.group(2)]}.{m.group(3)}"] = t
        else:
            unknown.append(name)
    if unknown:
        raise CheckpointError(f"model {model_name!r} has tensors {ARCHITECTURES[model_name]} cannot hold:"
                              f" {', '.join(sorted(unknown)[:8])}")
    return {k: v.detach().contiguous() for k, v in out.items()}


def hf_to_mega(hf_state: Mapping[str, torch.Tensor], model_name: str, num_layers: int, heads: int,
               padded_vocab: int, vocab: int, where: str) -> Dict[str, torch.Tensor]:
    """A transformers MegatronBert* state dict -> mega's names, QKV fused per head, the word
    embedding and the LM-head bias fitted to `padded_vocab` rows. Unknown tensors, a
    decoder that is not the word embedding, or a layer missing a part are refused."""
    back = {v: k for k, v in {**TOP, **_head_map(model_name)}.items()}
    state = dict(hf_state)
    word = state.get("bert.embeddings.word_embeddings.weight")
    if word is None:
        raise CheckpointError(f"{where}: no word embedding (bert.embeddings.word_embeddings.weight)")
    decoder = state.get("cls.predictions.decoder.weight")
    if decoder is not None and not torch.equal(decoder, word):
        raise CheckpointError(f"{where}: cls.predictions.decoder.weight differs from the word embedding;"
                              " Megatron-BERT ties them")
    if word.shape[0] < vocab:
        raise CheckpointError(f"{where}: the word embedding has {word.shape[0]} rows, the tokenizer {vocab} tokens")
    out: Dict[str, torch.Tensor] = {WORD: fit(word, [padded_vocab, word.shape[1]])}
    qkv: Dict[Tuple[str, str], Dict[str, torch.Tensor]] = {}
    layer_back = {v: k for k, v in LAYER_KEYS.items()}
    unknown = []
    for name, t in state.items():
        m = re.fullmatch(r"bert\.encoder\.layer\.(\d+)\.(.+)\.(weight|bias)", name)
        if name == "bert.embeddings.word_embeddings.weight" or HF_DERIVED.match(name):
            continue
        if name == "cls.predictions.bias":
            out[LM_BIAS] = fit(t, [padded_vocab])
        elif name in back:
            out[back[name]] = t
        elif m and int(m.group(1)) < num_layers and m.group(2) in ("attention.self.query", "attention.self.key",
                                                                      "attention.self.value"):
            qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2).rsplit(".", 1)[1]] = t
        elif m and int(m.group(1)) < num_layers and m.group(2) in layer_back:
            out[f"{LAYER}.{m.group(1)}.{layer_back[m.group(2)]}.{m.group(3)}"] = t
        else:
            unknown.append(name)
    if unknown:
        raise CheckpointError(f"{where}: tensors {ARCHITECTURES[model_name]} does not have (or of layers past"
                              f" num_hidden_layers={num_layers}): {', '.join(sorted(unknown)[:8])}")
    for (layer, kind), parts in sorted(qkv.items()):
        if set(parts) != {"query", "key", "value"}:
            raise CheckpointError(f"{where}: layer {layer} has attention.self {kind}s of {sorted(parts)} only")
        out[f"{LAYER}.{layer}.{QKV}.{kind}"] = fuse_qkv(parts["query"], parts["key"], parts["value"], heads)
    return out


# --- configs --------------------------------------------------------------------------------


def architecture_of(hf: dict, where: str) -> str:
    arch = [a for a in (hf.get("architectures") or []) if a in MODELS]
    if not arch:
        raise CheckpointError(f"{where}: architectures {hf.get('architectures')}: mega imports"
                              f" {', '.join(MODELS)}")
    return arch[0]


def mega_model_config(hf: dict, arch: str, where: str) -> dict:
    """`model.*` of the mega BERT model for a MegatronBertConfig (config.json as a dict);
    refuses what mega's BERT computes differently, naming the config.json field."""
    act = hf.get("hidden_act", "gelu")
    if act not in ACTIVATIONS:
        raise CheckpointError(f"{where}: hidden_act {act!r} has no mega equivalent (supported: {', '.join(ACTIVATIONS)})")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise CheckpointError(f"{where}: position_embedding_type={hf['position_embedding_type']!r}; mega's BERT has"
                              " learned absolute positions only")
    causal = arch == "MegatronBertForCausalLM"
    if bool(hf.get("is_decoder", False)) != causal:
        raise CheckpointError(f"{where}: is_decoder={str(bool(hf.get('is_decoder', False))).lower()} with {arch}; mega's"
                              f" {MODELS[arch]} attends {'causally' if causal else 'both ways'} (is_decoder="
                              f"{str(causal).lower()})")
    if hf.get("add_cross_attention"):
        raise CheckpointError(f"{where}: add_cross_attention=true; mega's BERT has no cross-attention")
    try:
        hidden, layers, heads, positions = (int(hf[k]) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                                  "max_position_embeddings"))
    except KeyError as exc:
        raise CheckpointError(f"{where}: has no {exc.args[0]}") from None
    model_name = MODELS[arch]
    model = {
        "name": model_name, "num_layers": layers, "hidden_size": hidden, "num_attention_heads": heads,
        "ffn_hidden_size": int(hf.get("intermediate_size") or 4 * hidden),
        "max_position_embeddings": positions, "seq_length": positions,
        "layernorm_epsilon": float(hf.get("layer_norm_eps", 1e-12)),
        "activation": ACTIVATIONS[act],
        "lm_head_activation": ACTIVATIONS[act],
        "hidden_dropout": float(hf.get("hidden_dropout_prob", 0.1)),
        "attention_dropout": float(hf.get("attention_probs_dropout_prob", 0.1)),
        "init_method_std": float(hf.get("initializer_range", 0.02)),
        "num_tokentypes": int(hf.get("type_vocab_size", 2)),
    }
    if arch in ("MegatronBertForSequenceClassification", "MegatronBertForTokenClassification"):
        model["num_labels"] = num_labels_of(hf)
    return model


def num_labels_of(hf: dict) -> int:
    if hf.get("id2label"):
        return len(hf["id2label"])
    return int(hf.get("num_labels", 2))


def hf_config(mc, tokenizer, dtype_name: str = "float32") -> dict:
    """config.json (MegatronBertConfig's fields) for mega's BERT config `mc`; the vocabulary
    is the tokenizer's (mega's padding rows are not written). transformers has one
    `hidden_act` for the MLP and the LM head: the MLP's is written, with a warning when the
    LM head's differs (Megatron-LM's fused bias-GeLU default: tanh in the MLP, exact GeLU in
    the head)."""
    arch = architecture(mc)
    model_name = mc.name
    act = getattr(mc, "activation", "gelu")
    if act not in EXPORT_ACTIVATIONS:
        raise CheckpointError(f"model.activation={act!r} has no transformers hidden_act")
    head_act = getattr(mc, "lm_head_activation", act)
    if head_act != act and arch in ("MegatronBertForPreTraining", "MegatronBertForMaskedLM", "MegatronBertForCausalLM"):
        log.warning("model.activation=%r but model.lm_head_activation=%r: transformers' MegatronBert has one hidden_act"
                    " (%s) for both, so its LM-head outputs will differ slightly from mega's", act, head_act,
                    EXPORT_ACTIVATIONS[act])
    config = {
        "architectures": [arch],
        "model_type": MODEL_TYPE,
        "vocab_size": tokenizer.vocab_size,
        "hidden_size": mc.hidden_size,
        "num_hidden_layers": mc.num_layers,
        "num_attention_heads": mc.num_attention_heads,
        "intermediate_size": getattr(mc, "ffn_hidden_size", None) or 4 * mc.hidden_size,
        "hidden_act": EXPORT_ACTIVATIONS[act],
        "hidden_dropout_prob": mc.hidden_dropout,
        "attention_probs_dropout_prob": mc.attention_dropout,
        "max_position_embeddings": getattr(mc, "max_position_embeddings", None) or mc.seq_length,
        "type_vocab_size": max(int(getattr(mc, "num_tokentypes", 2) or 0), 1),
        "initializer_range": mc.init_method_std,
        "layer_norm_eps": mc.layernorm_epsilon,
        "position_embedding_type": "absolute",
        "pad_token_id": getattr(tokenizer, "pad_id", 0),
        "tie_word_embeddings": True,
        "torch_dtype": dtype_name,
    }
    if model_name == "bert_causal_lm":
        config["is_decoder"] = True
    labels = None
    if arch in ("MegatronBertForSequenceClassification", "MegatronBertForTokenClassification"):
        labels = int(getattr(mc, "num_labels"))
    elif arch == "MegatronBertForQuestionAnswering":
        labels = 2
    if labels is not None:
        config["num_labels"] = labels
        config["id2label"] = {str(i): f"LABEL_{i}" for i in range(labels)}
        config["label2id"] = {f"LABEL_{i}": i for i in range(labels)}
    return config


def checked_mega_to_hf(state: Mapping[str, torch.Tensor], mc, vocab: int) -> Dict[str, torch.Tensor]:
    """`mega_to_hf` for a run's config `mc`, with the token-type embedding transformers
    always has (one zero row when the model has none)."""
    out = mega_to_hf(state, mc.name, mc.num_layers, mc.num_attention_heads, vocab)
    if "bert.embeddings.token_type_embeddings.weight" not in out:  # num_tokentypes = 0: HF always adds one
        out["bert.embeddings.token_type_embeddings.weight"] = torch.zeros(1, mc.hidden_size)
    return out
