"""Megatron-BERT in Megatron-LM's legacy checkpoints: recognising one, its `args`, and the
model table an imported one gets.

Megatron-BERT's files hold, beside the GPT-shaped `language_model`, the token-type
embedding (`language_model.embedding.tokentype_embeddings`), the pooler
(`language_model.pooler`), the LM head (`lm_head`: dense, layernorm, a vocabulary-parallel
bias) and the binary (NSP/SOP) head (`binary_head`); Megatron's fine-tuning models add
`classification_head` or `multichoice_head`. mega's BERT parameters carry exactly these
names, so the tensors map key for key; what this module adds is the `args` Megatron's BERT
has (`bert_binary_head`, its GeLU flags, the head sizes; the WordPiece `tokenizer_type` and
`vocab_file` are the tokenizer's converter's) and the model table an imported BERT gets.

Files from NGC's `megatron_bert_345m` release (a zip holding
`release/mp_rank_00/model_optim_rng.pt`, checkpoint_version 0, vocabulary padded to 30592 /
29056 rows) may lack `args`; then the shape comes from the tensors and the head count from
`--option num_attention_heads=N` (the `megatron` format's).
"""
from __future__ import annotations

from typing import Dict, Mapping

import torch

from mega.errors import CheckpointError
from mega.plugins.models.gpt_interop.megatron import activation_of

# Megatron-LM's BERT tokenizers: a checkpoint whose args name one is a BERT
BERT_TYPES = ("BertWordPieceLowerCase", "BertWordPieceCase")
# mega BERT model names whose classifier Megatron-LM has, and its key
MEGATRON_HEADS = {"classification_head": "bert_sequence_classification", "multichoice_head": "bert_multiple_choice"}
TOKENTYPES = "language_model.embedding.tokentype_embeddings.weight"


def is_bert(state: Mapping[str, torch.Tensor], args) -> bool:
    """A BERT checkpoint: its tensors (LM head, binary head, token types, pooler) or its
    args (Megatron's BERT tokenizer) say so."""
    if getattr(args, "tokenizer_type", None) in BERT_TYPES:
        return True
    return any(k.startswith(("lm_head.", "binary_head.", "language_model.pooler.", *MEGATRON_HEADS)) or k == TOKENTYPES
               for k in state)


def bert_args(model: dict) -> dict:
    """The fields Megatron-LM's BERT adds to `args` for a mega BERT model table (the
    WordPiece `tokenizer_type` and `vocab_file` come with every tokenizer's fields)."""
    fields = {"bert_binary_head": bool(model.get("add_binary_head", True)),
              "num_tokentypes": model.get("num_tokentypes", 2)}
    # Megatron-LM's GeLU flags: its fused bias-GeLU is tanh in the MLP only (the LM head
    # keeps exact GeLU); openai_gelu is tanh in both
    mlp, head = model.get("activation", "gelu"), model.get("lm_head_activation", "gelu")
    fields.update(bias_gelu_fusion=mlp == "gelu_tanh" and head == "gelu", openai_gelu=head == "gelu_tanh")
    for key in ("num_labels", "num_choices"):
        if model.get(key) is not None:
            fields[f"mega_{key}"] = model[key]
    if model.get("num_labels") is not None:
        fields["num_classes"] = model["num_labels"]  # Megatron's Classification head size
    return fields


def model_name(state: Mapping[str, torch.Tensor], args) -> str:
    if getattr(args, "mega_model", None):
        return str(args.mega_model)
    for key, name in MEGATRON_HEADS.items():
        if any(k.startswith(key + ".") for k in state):
            return name
    return "bert"


def model_table(state: Dict[str, torch.Tensor], args, where: str) -> dict:
    """`model.*` of the mega BERT these merged tensors (mega's names) and `args` describe."""
    word = state.get("language_model.embedding.word_embeddings.weight")
    if word is None or not any(k.startswith("language_model.encoder.layers.") for k in state):
        raise CheckpointError(f"{where}: holds no BERT language model (word embeddings and layers)")
    positions = state.get("language_model.embedding.position_embeddings.weight")
    if positions is None:
        raise CheckpointError(f"{where}: has no position embedding; mega's BERT has learned absolute positions")
    layers = 1 + max(int(k.split(".")[3]) for k in state if k.startswith("language_model.encoder.layers."))
    num_layers = getattr(args, "num_layers", None) or layers
    if num_layers != layers:
        raise CheckpointError(f"{where}: args.num_layers={num_layers} but the files hold {layers} layers")
    hidden = getattr(args, "hidden_size", None) or word.shape[1]
    heads = getattr(args, "num_attention_heads", None)
    if not heads:
        raise CheckpointError(f"{where}: its args do not say num_attention_heads; give --option num_attention_heads=N")
    name = model_name(state, args)
    tokentypes = state.get(TOKENTYPES)
    max_pos = positions.shape[0]
    model = {
        "name": name, "num_layers": num_layers, "hidden_size": hidden, "num_attention_heads": int(heads),
        "ffn_hidden_size": state["language_model.encoder.layers.0.mlp.dense_h_to_4h.weight"].shape[0],
        "max_position_embeddings": max_pos,
        "seq_length": min(getattr(args, "seq_length", None) or max_pos, max_pos),
        "layernorm_epsilon": getattr(args, "layernorm_epsilon", None) or 1e-5,
        "activation": activation_of(args),
        "lm_head_activation": "gelu_tanh" if getattr(args, "openai_gelu", False) else "gelu",
        "num_tokentypes": tokentypes.shape[0] if tokentypes is not None else 0,
    }
    if name == "bert":
        model["add_binary_head"] = "binary_head.weight" in state
    for key in ("hidden_dropout", "attention_dropout", "init_method_std"):
        if isinstance(getattr(args, key, None), float):
            model[key] = getattr(args, key)
    head = next((k for k in ("classification_head.weight", "token_classification_head.weight") if k in state), None)
    if head is not None:
        model["num_labels"] = int(getattr(args, "mega_num_labels", None) or state[head].shape[0])
    return model
