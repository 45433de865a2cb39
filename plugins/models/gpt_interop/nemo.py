"""GPT in NeMo 1.x archives (`MegatronGPTModel`): `model_config.yaml` -> mega's model table,
and the weight names of both NeMo namings.

NeMo's legacy names are Megatron-LM's, which are mega's (the `nemo` format has already
brought older spellings up to date); megatron-core's (`mcore_gpt: true`) go through the
one table of `mcore.py`. The last pipeline stage's copy of the tied word embedding is not
a weight of its own. What mega's GPT cannot run (rotary positions, SwiGLU, RMSNorm,
bias-less layers, an untied output layer, grouped-query attention, post-LN blocks) is
refused naming the yaml key.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from mega.errors import CheckpointError
from mega.plugins.models.gpt_interop import mcore

CONFIG = "model_config.yaml"
# NeMo's `activation` names mega's GPT can run. NeMo (legacy ParallelMLP and megatron-core
# alike) computes `gelu` with its fused bias-GELU kernel while `bias_activation_fusion` is
# true (the default), which is the tanh approximation; exact (erf) GELU only with the fusion
# off; `openai_gelu: true` forces the tanh form. `fast-gelu` / `openai-gelu` are not NeMo's
# own names but say tanh GELU unambiguously. `approx-gelu` is x * sigmoid(1.702 x) (quick
# GELU), which mega's GPT does not have: refused.
ACTIVATIONS = ("gelu", "fast-gelu", "openai-gelu")
NORMS = ("layernorm", "low_precision_layernorm")
# yaml keys copied to mega's model table unchanged
COPIED = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "max_position_embeddings",
          "layernorm_epsilon", "make_vocab_size_divisible_by", "hidden_dropout", "attention_dropout", "init_method_std",
          "micro_batch_size", "global_batch_size")
# the last pipeline stage's copy of the tied word embedding (legacy NeMo, Megatron-LM, mcore)
TIED_COPIES = ("word_embeddings.weight", "word_embeddings_for_head.weight", "output_layer.weight")


def is_gpt(cfg: dict) -> Optional[bool]:
    """True when the yaml's `target` is a GPT class, None when it names none."""
    target = str(cfg.get("target", ""))
    return ("GPT" in target) if target else None


def model_config(cfg: dict, source: Path = Path("model.nemo")) -> dict:
    """mega's `model` table for a NeMo Megatron GPT `model_config.yaml` (tokenizer aside);
    what mega's GPT cannot run is refused naming the yaml key."""

    def refuse(key: str, why: str):
        raise CheckpointError(f"{source}: {CONFIG}: {key}={cfg.get(key)!r}: {why}")

    if is_gpt(cfg) is False:
        refuse("target", "only Megatron GPT models are imported")
    if cfg.get("position_embedding_type", "learned_absolute") != "learned_absolute":
        refuse("position_embedding_type", "mega's gpt has learned absolute positions only (no rotary/alibi)")
    if cfg.get("activation", "gelu") == "approx-gelu":
        refuse("activation", "NeMo's approx-gelu is x * sigmoid(1.702 x) (quick GELU); mega's gpt runs exact or tanh GELU")
    if cfg.get("activation", "gelu") not in ACTIVATIONS:
        refuse("activation", f"mega's gpt runs {', '.join(ACTIVATIONS)} (no gated MLPs such as swiglu)")
    if cfg.get("normalization", "layernorm") not in NORMS:
        refuse("normalization", "mega's gpt uses LayerNorm (no RMSNorm or layernorm1p)")
    if cfg.get("bias", True) is not True:
        refuse("bias", "mega's gpt has biases in every linear layer")
    if cfg.get("share_embeddings_and_output_weights", True) is not True:
        refuse("share_embeddings_and_output_weights", "mega's gpt ties its output layer to the word embedding")
    if cfg.get("transformer_block_type", "pre_ln") != "pre_ln":
        refuse("transformer_block_type", "mega's gpt is pre-LayerNorm")
    heads = cfg.get("num_attention_heads")
    if cfg.get("num_query_groups") not in (None, heads):
        refuse("num_query_groups", "mega's gpt has no grouped-query attention")
    if cfg.get("kv_channels") not in (None, (cfg.get("hidden_size") or 0) // max(heads or 1, 1)):
        refuse("kv_channels", "mega's gpt uses hidden_size / num_attention_heads per head")
    if cfg.get("virtual_pipeline_model_parallel_size") not in (None, 1):
        refuse("virtual_pipeline_model_parallel_size", "interleaved pipeline archives are not read")
    for key in ("num_layers", "hidden_size", "num_attention_heads", "encoder_seq_length"):
        if not isinstance(cfg.get(key), int):
            refuse(key, "needed, as an integer")
    table = {"name": "gpt", "seq_length": cfg["encoder_seq_length"], "activation": activation_of(cfg)}
    table.update({k: cfg[k] for k in COPIED if cfg.get(k) is not None})
    return table


def activation_of(cfg: dict) -> str:
    """mega's activation for a NeMo GPT yaml: `openai_gelu: true`, a tanh name, or `gelu`
    with `bias_activation_fusion` (default true: NeMo's fused bias-GELU is the tanh
    approximation) -> "gelu_tanh"; `gelu` with the fusion off -> exact "gelu"."""
    activation = cfg.get("activation", "gelu")
    if cfg.get("openai_gelu", False) or activation in ("fast-gelu", "openai-gelu"):
        return "gelu_tanh"
    return "gelu_tanh" if cfg.get("bias_activation_fusion", True) else "gelu"


def mega_name(name: str) -> Optional[str]:
    """A NeMo GPT weight's name (legacy or megatron-core, without the `model.` prefix) under
    mega's names; None for the last stage's tied copy; unknown names unchanged."""
    if name in TIED_COPIES:
        return None
    return mcore.mega_name(name)  # mcore_gpt's names, from the one table both ways; legacy names are mega's


# --- export: mega's gpt as NeMo 1.23.0's MegatronGPTModel (legacy names, mcore_gpt: false) --------
# Read at NeMo v1.23.0: nemo/collections/nlp/models/language_modeling/megatron_gpt_model.py and
# examples/nlp/language_modeling/conf/megatron_gpt_config.yaml (the keys its constructor and
# GPTModel read); the weights are `model.` + mega's names (legacy NeMo's are Megatron-LM's).

TARGET = "nemo.collections.nlp.models.language_modeling.megatron_gpt_model.MegatronGPTModel"
NEMO_RELEASE = "1.23.0"


def nemo_activation(activation: str) -> dict:
    """NeMo's keys for mega's GELU: its fused bias-GELU (bias_activation_fusion) is the tanh
    form, F.gelu with the fusion off the exact one (the inverse of `activation_of`)."""
    return {"activation": "gelu", "bias_activation_fusion": activation == "gelu_tanh", "openai_gelu": False}


def optim_section(mc) -> dict:
    """An `optim` section NeMo's optimizer setup accepts (only read when training resumes)."""
    optim = getattr(mc, "optim", None)
    return {"name": "adamw", "lr": float(getattr(optim, "lr", 1e-4) or 1e-4),
            "weight_decay": float(getattr(optim, "weight_decay", 0.0) or 0.0)}


def export_config(mc, tokenizer_section: dict, tp: int) -> dict:
    """model_config.yaml of MegatronGPTModel for mega's gpt config `mc` at TP `tp`."""
    from mega.errors import ConfigError

    if mc.num_attention_heads % tp:
        raise ConfigError(f"model.num_attention_heads={mc.num_attention_heads} is not divisible by --option"
                          f" tensor_parallel={tp}")
    seq = mc.seq_length
    return {
        "mcore_gpt": False, "micro_batch_size": mc.micro_batch_size,
        "global_batch_size": mc.global_batch_size or mc.micro_batch_size,
        "tensor_model_parallel_size": tp, "pipeline_model_parallel_size": 1, "virtual_pipeline_model_parallel_size": None,
        "encoder_seq_length": seq, "max_position_embeddings": mc.max_position_embeddings or seq,
        "num_layers": mc.num_layers, "hidden_size": mc.hidden_size,
        "ffn_hidden_size": mc.ffn_hidden_size or 4 * mc.hidden_size, "num_attention_heads": mc.num_attention_heads,
        "init_method_std": mc.init_method_std, "use_scaled_init_method": True, "hidden_dropout": mc.hidden_dropout,
        "attention_dropout": mc.attention_dropout, "ffn_dropout": 0.0, "kv_channels": None,
        "apply_query_key_layer_scaling": False, "normalization": "layernorm", "layernorm_epsilon": mc.layernorm_epsilon,
        "do_layer_norm_weight_decay": False, "make_vocab_size_divisible_by": mc.make_vocab_size_divisible_by,
        "pre_process": True, "post_process": True, "persist_layer_norm": True, "bias": True,
        **nemo_activation(mc.activation), "headscale": False, "transformer_block_type": "pre_ln",
        "normalize_attention_scores": True, "position_embedding_type": "learned_absolute", "rotary_percentage": 1.0,
        "attention_type": "multihead", "share_embeddings_and_output_weights": True, "num_query_groups": None,
        "tokenizer": tokenizer_section,
        "native_amp_init_scale": mc.native_amp_init_scale, "native_amp_growth_interval": mc.native_amp_growth_interval,
        "hysteresis": mc.hysteresis, "fp32_residual_connection": False, "fp16_lm_cross_entropy": False,
        "megatron_amp_O2": False, "bias_dropout_add_fusion": True, "masked_softmax_fusion": True,
        "seed": mc.seed, "precision": 32, "sequence_parallel": False, "transformer_engine": False,
        "use_flash_attention": False, "activations_checkpoint_granularity": None, "activations_checkpoint_method": None,
        "activations_checkpoint_num_layers": None,
        "data": {"data_prefix": [], "data_impl": "mmap", "splits_string": "900,50,50", "seq_length": seq,
                 "skip_warmup": True, "num_workers": 2, "dataloader_type": "single", "reset_position_ids": False,
                 "reset_attention_mask": False, "eod_mask_loss": False},
        "optim": optim_section(mc),
        "target": TARGET, "nemo_version": NEMO_RELEASE,
    }


def nemo_name(name: str) -> str:
    """mega's gpt tensor -> MegatronGPTModel's key (legacy: `model.` + Megatron-LM's name)."""
    return "model." + name
