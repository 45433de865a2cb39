"""The Llama family in NeMo 1.x archives (`MegatronGPTModel` with `mcore_gpt: true`, as
NeMo's `convert_llama_hf_to_nemo.py` writes them): `model_config.yaml` -> the `llama`
model table, and the weights' names (megatron-core's, GPT's table, plus the untied
`output_layer`).

NeMo spells some keys its own way (docs/llama.md): `rotary_percentage` (megatron-core's
`rotary_percent`), `normalization: rmsnorm` (lower case), `activation: swiglu` or
`fast-swiglu` (both SiLU with a gated linear unit), `bias` (`add_bias_linear`), `qkv_bias`
(`add_qkv_bias`), `scale_positional_embedding` with `scale_factor` (Llama 3.1's RoPE scaling).
What mega does not build is refused naming the yaml key.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from mega.errors import CheckpointError
from mega.plugins.models.gpt_interop import mcore

CONFIG = "model_config.yaml"
GATED = ("swiglu", "fast-swiglu")
GELU = ("gelu", "fast-gelu", "openai-gelu")
NORMALIZATIONS = {"rmsnorm": "RMSNorm", "layernorm": "LayerNorm", "low_precision_layernorm": "LayerNorm",
                  "RMSNorm": "RMSNorm", "LayerNorm": "LayerNorm"}
COPIED = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
          "max_position_embeddings", "layernorm_epsilon", "make_vocab_size_divisible_by", "hidden_dropout",
          "attention_dropout", "init_method_std", "rotary_base", "rotary_interleaved", "seq_len_interpolation_factor",
          "micro_batch_size", "global_batch_size")
# the last pipeline stage's copy of a tied word embedding (legacy NeMo, Megatron-LM)
TIED_COPIES = ("word_embeddings.weight", "word_embeddings_for_head.weight")


def is_gpt(cfg: dict) -> Optional[bool]:
    target = str(cfg.get("target", ""))
    return ("GPT" in target) if target else None


def marked(cfg: dict) -> bool:
    """A GPT yaml with the Llama family's architecture (rotary or no positions, RMSNorm, a
    gated MLP, no biases, an untied output layer or grouped-query attention)."""
    heads = cfg.get("num_attention_heads")
    return (cfg.get("position_embedding_type", "learned_absolute") in ("rope", "none")
            or str(cfg.get("normalization", "layernorm")).lower() == "rmsnorm"
            or cfg.get("activation") in GATED or cfg.get("bias", True) is False
            or cfg.get("share_embeddings_and_output_weights", True) is False
            or cfg.get("num_query_groups") not in (None, heads))


def model_table(cfg: dict, source: Path = Path("model.nemo")) -> dict:
    """The `llama` model table for a NeMo GPT `model_config.yaml` (tokenizer aside)."""

    def refuse(key: str, why: str):
        raise CheckpointError(f"{source}: {CONFIG}: {key}={cfg.get(key)!r}: {why}")

    if is_gpt(cfg) is False:
        refuse("target", "only Megatron GPT models are imported")
    positions = cfg.get("position_embedding_type", "learned_absolute")
    if positions not in ("learned_absolute", "rope", "none"):
        refuse("position_embedding_type", "mega builds learned absolute, rotary (rope) and no position embeddings")
    activation = cfg.get("activation", "gelu")
    if activation not in GATED + GELU:
        refuse("activation", f"mega builds {', '.join(GATED + GELU)}")
    if str(cfg.get("normalization", "layernorm")) not in NORMALIZATIONS:
        refuse("normalization", "mega builds layernorm and rmsnorm (not layernorm1p)")
    if cfg.get("transformer_block_type", "pre_ln") != "pre_ln":
        refuse("transformer_block_type", "mega's blocks are pre-norm")
    if cfg.get("qk_layernorm"):
        refuse("qk_layernorm", "query/key layer norms are not built")
    if cfg.get("num_moe_experts") not in (None, 0, 1):
        refuse("num_moe_experts", "mixture-of-experts layers are not built")
    if cfg.get("virtual_pipeline_model_parallel_size") not in (None, 1):
        refuse("virtual_pipeline_model_parallel_size", "interleaved pipeline archives are not read")
    for key in ("num_layers", "hidden_size", "num_attention_heads", "encoder_seq_length"):
        if not isinstance(cfg.get(key), int):
            refuse(key, "needed, as an integer")
    table = {"name": "llama", "seq_length": cfg["encoder_seq_length"], "position_embedding_type": positions,
             "normalization": NORMALIZATIONS[str(cfg.get("normalization", "layernorm"))],
             "add_bias_linear": bool(cfg.get("bias", True)),
             "share_embeddings_and_output_weights": bool(cfg.get("share_embeddings_and_output_weights", True))}
    table["activation"] = "swiglu" if activation in GATED else (
        "gelu_tanh" if cfg.get("openai_gelu") or activation != "gelu" or cfg.get("bias_activation_fusion", True) else "gelu")
    if cfg.get("qkv_bias") and not table["add_bias_linear"]:
        table["add_qkv_bias"] = True
    table.update({k: cfg[k] for k in COPIED if cfg.get(k) is not None})
    if cfg.get("num_query_groups") == cfg["num_attention_heads"]:
        table.pop("num_query_groups")
    if positions == "rope":
        if cfg.get("rotary_percentage") is not None:
            table["rotary_percent"] = float(cfg["rotary_percentage"])
        if cfg.get("scale_positional_embedding"):
            table.update(rope_scaling=True, rope_scaling_factor=float(cfg.get("scale_factor", 8.0)))
            for key in ("low_freq_factor", "high_freq_factor", "old_context_len"):
                if cfg.get(key) is not None:
                    table[key] = cfg[key]
        if "rotary_base" in table:
            table["rotary_base"] = float(table["rotary_base"])
    else:
        for key in ("rotary_base", "rotary_interleaved", "seq_len_interpolation_factor"):
            table.pop(key, None)
    if table.get("max_position_embeddings") is None:
        table["max_position_embeddings"] = table["seq_length"]
    return table


def mega_name(name: str, tied: bool) -> Optional[str]:
    """A NeMo weight's name (without `model.`) under mega's names; None for the last stage's
    copy of a tied embedding (with `tied`, megatron-core's `output_layer.weight` is one)."""
    if name in TIED_COPIES or (tied and name == "output_layer.weight"):
        return None
    return mcore.mega_name(name)
