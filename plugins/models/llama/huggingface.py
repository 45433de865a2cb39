"""The Llama family as transformers' LlamaForCausalLM, MistralForCausalLM and
Qwen2ForCausalLM (`model_type` "llama", "mistral", "qwen2"): config.json <-> mega's
model table, and the state dict both ways.

The three classes share one state dict (names below, `model.` prefix) and differ in
config.json only: Llama's `attention_bias`/`mlp_bias` (o_proj too), Qwen2's QKV-only bias,
Mistral's `sliding_window`. mega's layouts are megatron-core's, so two tensors are fused:

    model.embed_tokens                  language_model.embedding.word_embeddings (padded rows)
    layers.N.input_layernorm            language_model.encoder.layers.N.input_layernorm
    layers.N.self_attn.{q,k,v}_proj     ...self_attention.query_key_value: rows grouped per
                                        key/value head, [q heads of the group | k | v]
    layers.N.self_attn.o_proj           ...self_attention.dense
    layers.N.post_attention_layernorm   ...post_attention_layernorm
    layers.N.mlp.{gate,up}_proj         ...mlp.dense_h_to_4h = [gate; up]
    layers.N.mlp.down_proj              ...mlp.dense_4h_to_h
    model.norm                          language_model.encoder.final_layernorm
    lm_head (absent when tied)          language_model.output_layer (padded rows)

HF's q/k rows are already in the "half" RoPE layout (its converter permuted Meta's), which
is mega's `rotary_interleaved = false`: no permutation here. Old files' `rotary_emb.inv_freq`
buffers are dropped. What no class of the three computes the same way is refused, naming
the config.json field on import and the mega key on export (docs/llama.md).
"""
from __future__ import annotations

import re
from typing import Dict, Mapping, Optional

import torch

from mega.errors import CheckpointError
from mega.plugins.models.transformer import BlockConfig
from mega.runtime.sharding import fit

MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
# HF name inside a decoder layer -> mega's name inside a layer (the fused ones aside)
LAYER_KEYS = {
    "input_layernorm.weight": "input_layernorm.weight",
    "post_attention_layernorm.weight": "post_attention_layernorm.weight",
    "self_attn.o_proj.weight": "self_attention.dense.weight",
    "self_attn.o_proj.bias": "self_attention.dense.bias",
    "mlp.down_proj.weight": "mlp.dense_4h_to_h.weight",
    "mlp.down_proj.bias": "mlp.dense_4h_to_h.bias",
}
QKV = ("q_proj", "k_proj", "v_proj")
GATE_UP = ("gate_proj", "up_proj")
WORD = "language_model.embedding.word_embeddings.weight"
OUTPUT = "language_model.output_layer.weight"
FINAL = "language_model.encoder.final_layernorm.weight"
LAYER = "language_model.encoder.layers"
BUFFERS = re.compile(r"layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")
# seq_length of an import when --option seq_length is not given: max_position_embeddings
# is a limit for rotary models (131072 for Llama 3.1), not a size worth planning for
DEFAULT_SEQ_LENGTH = 8192


# --- fused QKV: HF's q, k, v blocks <-> rows grouped per key/value head --------------------------


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
    """q [nh * hd, ...], k and v [ng * hd, ...] -> [(nh + 2 ng) * hd, ...] rows ordered per
    group g: its query heads, its key head, its value head (megatron-core's linear_qkv)."""
    rest = q.shape[1:]
    hd = k.shape[0] // groups
    per_group = q.shape[0] // (groups * hd)
    fused = torch.cat([q.reshape(groups, per_group, hd, *rest), k.reshape(groups, 1, hd, *rest),
                       v.reshape(groups, 1, hd, *rest)], dim=1)
    return fused.reshape(-1, *rest).contiguous()


def split_qkv(qkv: torch.Tensor, heads: int, groups: int):
    """The inverse of fuse_qkv: (q, k, v) row blocks."""
    rest = qkv.shape[1:]
    per_group = heads // groups
    hd = qkv.shape[0] // (heads + 2 * groups)
    q, k, v = qkv.reshape(groups, per_group + 2, hd, *rest).split([per_group, 1, 1], dim=1)
    return tuple(t.reshape(-1, *rest).contiguous() for t in (q, k, v))


# --- config.json -> model table ------------------------------------------------------------------


def _refuse(where: str, field: str, value, why: str):
    raise CheckpointError(f"{where}: {field}={value!r}: {why}")


def _rope(hf: dict, where: str) -> dict:
    """mega's RoPE keys for config.json's `rope_theta`, `rope_scaling`, `partial_rotary_factor`."""
    keys = {"position_embedding_type": "rope", "rotary_base": float(hf.get("rope_theta", 10000.0))}
    if hf.get("partial_rotary_factor", 1.0) != 1.0:
        _refuse(where, "partial_rotary_factor", hf["partial_rotary_factor"],
                "transformers' Llama, Mistral and Qwen2 rotate every head dim; a partial rotary factor is not read")
    scaling = hf.get("rope_scaling")
    if not scaling:
        return keys
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "default":
        return keys
    if kind == "linear":
        keys["seq_len_interpolation_factor"] = float(scaling["factor"])
    elif kind == "llama3":
        keys.update(rope_scaling=True, rope_scaling_factor=float(scaling["factor"]),
                    low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
                    high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
                    old_context_len=int(scaling.get("original_max_position_embeddings", 8192)))
    else:
        _refuse(where, "rope_scaling.rope_type", kind, "mega builds the default, \"linear\" and \"llama3\" RoPE"
                " (not dynamic-NTK, YaRN, LongRoPE)")
    return keys


def _biases(hf: dict, model_type: str, where: str) -> dict:
    if model_type == "qwen2":  # Qwen2: q, k, v biased, nothing else
        return {"add_bias_linear": False, "add_qkv_bias": True}
    attention, mlp = bool(hf.get("attention_bias", False)), bool(hf.get("mlp_bias", False))
    if attention != mlp:
        _refuse(where, "attention_bias", attention, f"with mlp_bias={mlp}: megatron-core (and mega) bias every linear"
                " (add_bias_linear) or the QKV only (add_qkv_bias); Llama's attention_bias also biases o_proj")
    return {"add_bias_linear": attention, "add_qkv_bias": False}


def model_table(hf: dict, where: str) -> dict:
    """`model.*` of mega's `llama` model for a Llama/Mistral/Qwen2 config.json."""
    model_type = hf.get("model_type")
    if model_type not in MODEL_TYPES:
        _refuse(where, "model_type", model_type, f"the llama converters read {', '.join(MODEL_TYPES)}")
    architectures = hf.get("architectures") or [MODEL_TYPES[model_type]]
    if MODEL_TYPES[model_type] not in architectures:
        _refuse(where, "architectures", architectures, f"model_type {model_type!r} imports as {MODEL_TYPES[model_type]}")
    if hf.get("hidden_act", "silu") != "silu":
        _refuse(where, "hidden_act", hf["hidden_act"], "mega's gated MLP (swiglu) applies SiLU to the gate")
    for field in ("num_local_experts", "num_experts"):
        if hf.get(field) not in (None, 0, 1):
            _refuse(where, field, hf[field], "mixture-of-experts layers are not built")
    if model_type == "mistral" and hf.get("rope_scaling"):
        _refuse(where, "rope_scaling", hf["rope_scaling"], "transformers' MistralForCausalLM (4.47) ignores it; mega"
                " would scale RoPE: remove the field, or import the model as model_type \"llama\"")
    if model_type == "qwen2" and hf.get("use_sliding_window"):
        _refuse(where, "use_sliding_window", True, "Qwen2's per-layer sliding window (max_window_layers) is not built")
    try:
        hidden, layers, heads = int(hf["hidden_size"]), int(hf["num_hidden_layers"]), int(hf["num_attention_heads"])
        ffn = int(hf["intermediate_size"])
    except KeyError as exc:
        raise CheckpointError(f"{where}: has no {exc.args[0]}") from None
    groups = int(hf.get("num_key_value_heads") or heads)
    head_dim = int(hf.get("head_dim") or hidden // heads)
    max_positions = int(hf.get("max_position_embeddings", 2048))
    table = {
        "name": "llama",
        "num_layers": layers, "hidden_size": hidden, "num_attention_heads": heads, "num_query_groups": groups,
        "ffn_hidden_size": ffn, "activation": "swiglu", "normalization": "RMSNorm",
        "layernorm_epsilon": float(hf.get("rms_norm_eps", 1e-6)),
        "max_position_embeddings": max_positions, "seq_length": min(max_positions, DEFAULT_SEQ_LENGTH),
        "share_embeddings_and_output_weights": bool(hf.get("tie_word_embeddings", False)),
        "hidden_dropout": 0.0, "attention_dropout": float(hf.get("attention_dropout", 0.0)),
        "init_method_std": float(hf.get("initializer_range", 0.02)),
        **_rope(hf, where), **_biases(hf, model_type, where),
    }
    if head_dim * heads != hidden:  # a head dim of its own (Mistral-NeMo: 5120 / 32 heads of 128)
        table["kv_channels"] = head_dim
    if model_type == "mistral" and hf.get("sliding_window") is not None:
        table["window_size"] = [int(hf["sliding_window"]) - 1, 0]  # HF eager: W keys, itself included
    return table


# --- state dicts ---------------------------------------------------------------------------------


def hf_to_mega(hf_state: Mapping[str, torch.Tensor], model: dict, padded_vocab: int, vocab: int,
               where: str) -> Dict[str, torch.Tensor]:
    """HF tensors -> mega's names: QKV and gate/up fused, the vocabulary-sized tensors
    fitted to `padded_vocab` rows (cut past the tokenizer's `vocab`, or zero-filled)."""
    state = dict(hf_state)
    heads, groups, layers = model["num_attention_heads"], model.get("num_query_groups") or model["num_attention_heads"], \
        model["num_layers"]
    tied = model.get("share_embeddings_and_output_weights", False)
    out: Dict[str, torch.Tensor] = {}

    def take(name: str) -> torch.Tensor:
        if name not in state:
            raise CheckpointError(f"{where}: has no tensor {name}")
        return state.pop(name)

    word = take("model.embed_tokens.weight")
    if word.shape[0] < vocab:
        raise CheckpointError(f"{where}: model.embed_tokens.weight has {word.shape[0]} rows, the tokenizer {vocab} tokens")
    out[WORD] = fit(word, [padded_vocab, word.shape[1]])
    head = state.pop("lm_head.weight", None)
    if tied:
        if head is not None and not torch.equal(head, word):
            raise CheckpointError(f"{where}: tie_word_embeddings is true but lm_head.weight differs from"
                                  " model.embed_tokens.weight")
    else:
        if head is None:
            raise CheckpointError(f"{where}: tie_word_embeddings is false but there is no lm_head.weight")
        out[OUTPUT] = fit(head, [padded_vocab, head.shape[1]])
    out[FINAL] = take("model.norm.weight")
    for i in range(layers):
        hf_layer, ours = f"model.layers.{i}.", f"{LAYER}.{i}."
        for suffix in ("weight", "bias"):
            parts = [state.pop(f"{hf_layer}self_attn.{p}.{suffix}", None) for p in QKV]
            if all(t is not None for t in parts):
                out[f"{ours}self_attention.query_key_value.{suffix}"] = fuse_qkv(*parts, groups)
            elif any(t is not None for t in parts):
                raise CheckpointError(f"{where}: layer {i} has some of q_proj, k_proj, v_proj {suffix} but not all")
            gate_up = [state.pop(f"{hf_layer}mlp.{p}.{suffix}", None) for p in GATE_UP]
            if all(t is not None for t in gate_up):
                out[f"{ours}mlp.dense_h_to_4h.{suffix}"] = torch.cat(gate_up).contiguous()
            elif any(t is not None for t in gate_up):
                raise CheckpointError(f"{where}: layer {i} has one of gate_proj, up_proj {suffix} but not both")
        for hf_name, name in LAYER_KEYS.items():
            if f"{hf_layer}{hf_name}" in state:
                out[ours + name] = state.pop(f"{hf_layer}{hf_name}")
        if f"{ours}self_attention.query_key_value.weight" not in out:
            raise CheckpointError(f"{where}: has no tensor {hf_layer}self_attn.q_proj.weight")
    unknown = sorted(k for k in state if not BUFFERS.search(k))
    if unknown:
        raise CheckpointError(f"{where}: tensors the model config does not have: {', '.join(unknown[:8])}")
    return out


def mega_to_hf(state: Mapping[str, torch.Tensor], model_config, vocab: int) -> Dict[str, torch.Tensor]:
    """mega's tensors (one process) -> the HF class's, the vocabulary cut to `vocab` rows;
    `lm_head.weight` only when the output layer is untied (save_pretrained drops tied ones)."""
    mc = model_config
    why = _export_refusals(mc)
    if why:
        raise CheckpointError(why)
    heads, groups = mc.num_attention_heads, mc.num_query_groups or mc.num_attention_heads
    known = {WORD, OUTPUT, FINAL}
    out: Dict[str, torch.Tensor] = {"model.embed_tokens.weight": state[WORD][:vocab], "model.norm.weight": state[FINAL]}
    if not mc.share_embeddings_and_output_weights:
        out["lm_head.weight"] = state[OUTPUT][:vocab]
    for i in range(mc.num_layers):
        hf_layer, ours = f"model.layers.{i}.", f"{LAYER}.{i}."
        for suffix in ("weight", "bias"):
            name = f"{ours}self_attention.query_key_value.{suffix}"
            if name in state:
                for part, t in zip(QKV, split_qkv(state[name], heads, groups)):
                    out[f"{hf_layer}self_attn.{part}.{suffix}"] = t
                known.add(name)
            name = f"{ours}mlp.dense_h_to_4h.{suffix}"
            if name in state:
                for part, t in zip(GATE_UP, state[name].chunk(2)):
                    out[f"{hf_layer}mlp.{part}.{suffix}"] = t
                known.add(name)
        for hf_name, name in LAYER_KEYS.items():
            if ours + name in state:
                out[hf_layer + hf_name] = state[ours + name]
                known.add(ours + name)
    extra = sorted(set(state) - known)
    if extra:
        raise CheckpointError(f"model {mc.name!r} has tensors no Llama, Mistral or Qwen2 class holds: {', '.join(extra[:8])}")
    return {k: v.detach().contiguous() for k, v in out.items()}


# --- model config -> config.json ------------------------------------------------------------------


def _export_refusals(mc) -> Optional[str]:
    """Why no transformers class of the three computes `mc` (naming the mega key), or None."""
    checks = (
        (mc.position_embedding_type != "rope", "model.position_embedding_type", "rotary embeddings (\"rope\")"),
        (mc.normalization != "RMSNorm", "model.normalization", "\"RMSNorm\""),
        (mc.activation != "swiglu", "model.activation", "\"swiglu\""),
        (mc.rotary_interleaved, "model.rotary_interleaved", "the half layout (false); Meta's interleaved rows need"
                                                            " permuting first"),
        (mc.rotary_percent != 1.0, "model.rotary_percent", "1.0 (every head dim rotates)"),
        (mc.window_size is not None and (mc.add_bias_linear or mc.add_qkv_bias), "model.window_size",
         "no biases with a sliding window (Mistral has none)"),
        (mc.window_size is not None and (mc.rope_scaling or mc.seq_len_interpolation_factor is not None),
         "model.window_size", "no RoPE scaling with a sliding window (MistralForCausalLM has none)"),
    )
    for bad, key, needed in checks:
        if bad:
            return f"{key}={getattr(mc, key.split('.')[1])!r}: Llama, Mistral and Qwen2 need {needed}"
    return None


def hf_class(mc) -> str:
    """The model_type an export writes: Mistral with a sliding window, Qwen2 with a bias on
    QKV only, Llama otherwise."""
    if mc.window_size is not None:
        return "mistral"
    if mc.add_qkv_bias and not mc.add_bias_linear:
        return "qwen2"
    return "llama"


def hf_config(mc, tokenizer, dtype: str) -> dict:
    """config.json for the run's model config (the vocabulary the tokenizer's)."""
    why = _export_refusals(mc)
    if why:
        raise CheckpointError(why)
    model_type = hf_class(mc)
    block = BlockConfig.of(mc)
    head_dim, ffn = block.head_dim, block.ffn
    if model_type == "qwen2" and head_dim * mc.num_attention_heads != mc.hidden_size:
        raise CheckpointError(f"model.kv_channels={mc.kv_channels}: Qwen2 computes the head dim as hidden_size /"
                              " num_attention_heads")
    config = {
        "architectures": [MODEL_TYPES[model_type]], "model_type": model_type,
        "vocab_size": tokenizer.vocab_size, "hidden_size": mc.hidden_size, "intermediate_size": ffn,
        "num_hidden_layers": mc.num_layers, "num_attention_heads": mc.num_attention_heads,
        "num_key_value_heads": mc.num_query_groups or mc.num_attention_heads, "hidden_act": "silu",
        "max_position_embeddings": mc.max_position_embeddings or mc.seq_length,
        "rms_norm_eps": mc.layernorm_epsilon, "rope_theta": mc.rotary_base,
        "tie_word_embeddings": mc.share_embeddings_and_output_weights, "attention_dropout": mc.attention_dropout,
        "initializer_range": mc.init_method_std, "use_cache": True, "torch_dtype": dtype,
    }
    if model_type != "mistral":
        config["rope_scaling"] = None
    if mc.rope_scaling:
        config["rope_scaling"] = {"rope_type": "llama3", "factor": mc.rope_scaling_factor,
                                  "low_freq_factor": mc.low_freq_factor, "high_freq_factor": mc.high_freq_factor,
                                  "original_max_position_embeddings": mc.old_context_len}
    elif mc.seq_len_interpolation_factor is not None:
        config["rope_scaling"] = {"rope_type": "linear", "factor": mc.seq_len_interpolation_factor}
    if model_type == "qwen2":
        config.update(use_sliding_window=False, sliding_window=None)
    else:
        config["head_dim"] = head_dim
        if model_type == "llama":
            config.update(attention_bias=mc.add_bias_linear, mlp_bias=mc.add_bias_linear)
        else:
            config["sliding_window"] = mc.window_size[0] + 1
    bos, eos = getattr(tokenizer, "bos_id", None), tokenizer.eos_id
    config.update(bos_token_id=bos, eos_token_id=eos)
    if tokenizer.pad_id != eos:
        config["pad_token_id"] = tokenizer.pad_id
    return config
