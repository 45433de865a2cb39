"""GPT as transformers' GPT-2 (`model_type = "gpt2"`, GPT2LMHeadModel / GPT2Model).

GPT-2 is the same network as mega's `gpt` model, so the mapping is exact:

    transformer.wte / wpe                 language_model.embedding.word_embeddings / position_embeddings
    transformer.h.N.ln_1 / ln_2           language_model.encoder.layers.N.input_layernorm / post_attention_layernorm
    transformer.h.N.attn.c_attn           ...self_attention.query_key_value
    transformer.h.N.attn.c_proj           ...self_attention.dense
    transformer.h.N.mlp.c_fc / c_proj     ...mlp.dense_h_to_4h / dense_4h_to_h
    transformer.ln_f                      language_model.encoder.final_layernorm
    lm_head (tied to wte)                 the word embedding (mega's output layer is tied)

GPT-2's `Conv1D` weights are [in, out], the transpose of a Linear's; `c_attn` holds a Q
block, a K block and a V block, mega's fused QKV rows are per head ([heads, 3, head_dim]).
The word embedding is padded to mega's vocabulary rule with zero rows on import, and cut
back to the tokenizer's vocabulary on export. `attn.bias` / `attn.masked_bias` (causal
mask buffers old files carry) are dropped.
"""
from __future__ import annotations

import re
from typing import Dict

import torch

from mega.errors import CheckpointError
from mega.runtime.sharding import fit

MODEL_TYPE = "gpt2"
# GPT-2's activation_function -> mega's model.activation
ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh", "gelu": "gelu"}
EXPORT_ACTIVATIONS = {"gelu_tanh": "gelu_new", "gelu": "gelu"}
ARCHITECTURES = ("GPT2LMHeadModel", "GPT2Model")
# HF name inside a block -> mega name inside a layer (Conv1D weights are transposed)
LAYER_KEYS = {
    "ln_1.weight": "input_layernorm.weight", "ln_1.bias": "input_layernorm.bias",
    "attn.c_attn.weight": "self_attention.query_key_value.weight", "attn.c_attn.bias": "self_attention.query_key_value.bias",
    "attn.c_proj.weight": "self_attention.dense.weight", "attn.c_proj.bias": "self_attention.dense.bias",
    "ln_2.weight": "post_attention_layernorm.weight", "ln_2.bias": "post_attention_layernorm.bias",
    "mlp.c_fc.weight": "mlp.dense_h_to_4h.weight", "mlp.c_fc.bias": "mlp.dense_h_to_4h.bias",
    "mlp.c_proj.weight": "mlp.dense_4h_to_h.weight", "mlp.c_proj.bias": "mlp.dense_4h_to_h.bias",
}
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
TOP_KEYS = {"wpe.weight": "language_model.embedding.position_embeddings.weight",
            "ln_f.weight": "language_model.encoder.final_layernorm.weight",
            "ln_f.bias": "language_model.encoder.final_layernorm.bias"}
WTE = "language_model.embedding.word_embeddings.weight"
LAYER = "language_model.encoder.layers"
BUFFERS = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)$")


# --- the fused QKV: GPT-2's [Q | K | V] blocks <-> mega's per-head [heads, 3, head_dim] rows ------


def qkv_blocks_to_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows (dim 0) ordered Q block, K block, V block -> per head (q, k, v) (Megatron's
    checkpoint_version 0 layout is GPT-2's c_attn)."""
    rest = t.shape[1:]
    return t.reshape(3, heads, -1, *rest).transpose(0, 1).reshape(t.shape).contiguous()


def qkv_heads_to_blocks(t: torch.Tensor, heads: int) -> torch.Tensor:
    rest = t.shape[1:]
    return t.reshape(heads, 3, -1, *rest).transpose(0, 1).reshape(t.shape)


# --- config.json <-> model table -----------------------------------------------------------------


def mega_model_config(hf: dict, where: str) -> dict:
    """`model.*` of mega's gpt for a GPT2Config (as config.json holds it); refuses what
    mega's GPT cannot compute the same way, by the config.json field."""
    arch = hf.get("architectures") or ["GPT2LMHeadModel"]
    if not set(arch) & set(ARCHITECTURES):
        raise CheckpointError(f"{where}: architectures {arch}: only GPT2LMHeadModel (or GPT2Model) imports into mega's gpt")
    act = hf.get("activation_function", "gelu_new")
    if act not in ACTIVATIONS:
        raise CheckpointError(f"{where}: activation_function {act!r} has no mega equivalent"
                              f" (supported: {', '.join(ACTIVATIONS)})")
    for key, ok in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False), ("add_cross_attention", False),
                    ("tie_word_embeddings", True)):
        if hf.get(key, ok) != ok:
            raise CheckpointError(f"{where}: {key}={hf[key]} is not supported (mega's gpt needs {str(ok).lower()})")
    try:
        n_embd, n_layer, n_head, n_positions = (int(hf[k]) for k in ("n_embd", "n_layer", "n_head", "n_positions"))
    except KeyError as exc:
        raise CheckpointError(f"{where}: has no {exc.args[0]}") from None
    return {
        "name": "gpt",
        "num_layers": n_layer,
        "hidden_size": n_embd,
        "num_attention_heads": n_head,
        "ffn_hidden_size": int(hf.get("n_inner") or 4 * n_embd),
        "max_position_embeddings": n_positions,
        "seq_length": n_positions,
        "layernorm_epsilon": float(hf.get("layer_norm_epsilon", 1e-5)),
        "activation": ACTIVATIONS[act],
        "hidden_dropout": float(hf.get("resid_pdrop", 0.1)),
        "attention_dropout": float(hf.get("attn_pdrop", 0.1)),
        "init_method_std": float(hf.get("initializer_range", 0.02)),
    }


def gpt2_config(mc, tokenizer, dtype_name: str = "float32") -> dict:
    """config.json (GPT2Config's fields) for mega's gpt config `mc`; the vocabulary is the
    tokenizer's (mega's padding rows are not written)."""
    if mc.activation not in EXPORT_ACTIVATIONS:
        raise CheckpointError(f"model.activation={mc.activation!r} has no GPT-2 activation_function")
    config = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": MODEL_TYPE,
        "vocab_size": tokenizer.vocab_size,
        "n_positions": mc.max_position_embeddings or mc.seq_length,
        "n_embd": mc.hidden_size,
        "n_layer": mc.num_layers,
        "n_head": mc.num_attention_heads,
        "n_inner": mc.ffn_hidden_size or 4 * mc.hidden_size,
        "activation_function": EXPORT_ACTIVATIONS[mc.activation],
        "layer_norm_epsilon": mc.layernorm_epsilon,
        "resid_pdrop": mc.hidden_dropout,
        "embd_pdrop": mc.hidden_dropout,
        "attn_pdrop": mc.attention_dropout,
        "initializer_range": mc.init_method_std,
        "scale_attn_weights": True,
        "tie_word_embeddings": True,
        "bos_token_id": tokenizer.eos_id,
        "eos_token_id": tokenizer.eos_id,
        "torch_dtype": dtype_name,
    }
    if tokenizer.pad_id != tokenizer.eos_id:
        config["pad_token_id"] = tokenizer.pad_id
    return config


# --- state dicts ----------------------------------------------------------------------------------


def hf_to_mega(hf_state: Dict[str, torch.Tensor], num_layers: int, heads: int, padded_vocab: int, vocab: int,
               where: str) -> Dict[str, torch.Tensor]:
    """GPT-2 tensors (with or without the `transformer.` prefix) -> mega's names, Conv1D
    transposed, QKV per head, the word embedding padded to `padded_vocab` rows."""
    state = {(k[len("transformer."):] if k.startswith("transformer.") else k): v for k, v in hf_state.items()}
    head = state.pop("lm_head.weight", None)
    out: Dict[str, torch.Tensor] = {}
    unknown = []
    for name, t in state.items():
        if BUFFERS.search(name):
            continue
        m = re.fullmatch(r"h\.(\d+)\.(.+)", name)
        if m and m.group(2) in LAYER_KEYS and int(m.group(1)) < num_layers:
            sub = m.group(2)
            t = t.t() if sub in CONV1D else t
            if sub.startswith("attn.c_attn."):
                t = qkv_blocks_to_heads(t, heads)
            out[f"{LAYER}.{m.group(1)}.{LAYER_KEYS[sub]}"] = t.contiguous()
        elif name in TOP_KEYS:
            out[TOP_KEYS[name]] = t
        elif name != "wte.weight":
            unknown.append(name)
    if unknown:
        raise CheckpointError(f"{where}: tensors GPT-2 does not have: {', '.join(sorted(unknown)[:8])}")
    if "wte.weight" not in state:
        raise CheckpointError(f"{where}: no word embedding (transformer.wte.weight)")
    wte = state["wte.weight"]
    if head is not None and not torch.equal(head, wte):
        raise CheckpointError(f"{where}: lm_head.weight differs from transformer.wte.weight; mega's gpt ties them")
    rows = wte.shape[0]
    if rows < vocab:
        raise CheckpointError(f"{where}: the word embedding has {rows} rows, the tokenizer {vocab} tokens")
    # rows past the tokenizer's vocabulary are padding either way: cut or zero-filled
    out[WTE] = fit(wte, [padded_vocab, wte.shape[1]])
    return out


def expected_keys(num_layers: int) -> list:
    """mega's gpt tensor names that GPT-2 holds."""
    return [WTE, *TOP_KEYS.values(), *(f"{LAYER}.{i}.{n}" for i in range(num_layers) for n in LAYER_KEYS.values())]


def mega_to_hf(state: Dict[str, torch.Tensor], num_layers: int, heads: int, vocab: int) -> Dict[str, torch.Tensor]:
    """mega's gpt tensors (one process) -> GPT2LMHeadModel's, the word embedding cut to
    the tokenizer's `vocab` rows (lm_head is tied to it, so not written)."""
    back = {v: k for k, v in LAYER_KEYS.items()}
    out: Dict[str, torch.Tensor] = {"transformer.wte.weight": state[WTE][:vocab]}
    for hf_name, name in TOP_KEYS.items():
        out[f"transformer.{hf_name}"] = state[name]
    for i in range(num_layers):
        for name, sub in back.items():
            t = state[f"{LAYER}.{i}.{name}"]
            if sub.startswith("attn.c_attn."):
                t = qkv_heads_to_blocks(t, heads)
            out[f"transformer.h.{i}.{sub}"] = t.t() if sub in CONV1D else t
    return {k: v.detach().contiguous() for k, v in out.items()}


# architecture options GPT-2 has only at these values (mega.plugins.models.architecture)
GPT2_SHAPE = (("position_embedding_type", ("learned_absolute",)), ("normalization", ("LayerNorm",)),
              ("add_bias_linear", (True,)), ("add_qkv_bias", (False,)), ("share_embeddings_and_output_weights", (True,)),
              ("window_size", (None,)))


def check_gpt2_shape(mc, writer: str = "GPT2LMHeadModel") -> None:
    """Refuse, naming the key, a GPT whose architecture options `writer` (a GPT-2-shaped
    class another tool builds) does not have (the Llama family's are written for
    transformers by the `llama` model's converter)."""
    found = [(key, getattr(mc, key, ok[0])) for key, ok in GPT2_SHAPE if getattr(mc, key, ok[0]) not in ok]
    heads = mc.num_attention_heads
    if getattr(mc, "num_query_groups", None) not in (None, heads):
        found.append(("num_query_groups", mc.num_query_groups))
    if getattr(mc, "kv_channels", None) not in (None, mc.hidden_size // heads):
        found.append(("kv_channels", mc.kv_channels))
    if mc.activation not in EXPORT_ACTIVATIONS:
        found.append(("activation", mc.activation))
    if found:
        key, value = found[0]
        raise CheckpointError(f"model.{key}={value!r}: {writer} has no such option; a model with the Llama"
                              " family's options exports to transformers as model.name = \"llama\" (the same network,"
                              " docs/llama.md)")


def checked_mega_to_hf(state: Dict[str, torch.Tensor], mc, vocab: int) -> Dict[str, torch.Tensor]:
    """`mega_to_hf`, refusing a state GPT2LMHeadModel cannot hold whole."""
    check_gpt2_shape(mc)
    extra = sorted(set(state) - set(expected_keys(mc.num_layers)))
    if extra:
        raise CheckpointError(f"model {mc.name!r} has tensors GPT2LMHeadModel cannot hold: {', '.join(extra[:8])}")
    return mega_to_hf(state, mc.num_layers, mc.num_attention_heads, vocab)
