"""GPT in Megatron-LM's legacy checkpoints: the architecture fields of `args` both ways,
what mega's GPT cannot run, and the model table an imported checkpoint gets.

mega's parameter names are Megatron-LM's legacy ones (`language_model.embedding...`,
`language_model.encoder.layers.N...`, `language_model.output_layer`), so tensors map key
for key; the `megatron` format reads and writes the files, merges and splits the shards
and fills in the vocabulary, tokenizer, parallel-layout and training fields of `args`.
The architecture options (rotary positions, RMSNorm, SwiGLU, grouped-query attention,
biases, an untied output layer, a sliding window) are written under megatron-core's
`args` names and read back from them (and from the deprecated spellings:
`use_rotary_position_embeddings`, `add_position_embedding`, `norm_epsilon`).
"""
from __future__ import annotations

import re
from typing import Mapping

from mega.errors import CheckpointError, ConfigError
from mega.plugins.models.architecture import default_ffn

WORD = "language_model.embedding.word_embeddings.weight"
POSITIONS = "language_model.embedding.position_embeddings.weight"
LAYER0 = "language_model.encoder.layers.0."
UNTIED = "language_model.output_layer.weight"

# args fields whose values mega's GPT cannot honour: field -> (acceptable values, what it means)
UNSUPPORTED = (
    ("squared_relu", (None, False), "squared-ReLU MLP"),
    ("position_embedding_type", (None, "learned_absolute", "rope", "none"), "YaRN, mRoPE or relative positions"),
    ("apply_layernorm_1p", (None, False), "LayerNorm with 1 + weight"),
    ("apply_residual_connection_post_layernorm", (None, False), "residual connections after the LayerNorm"),
    ("qk_layernorm", (None, False), "query/key layer norms"),
    ("multi_latent_attention", (None, False), "multi-latent attention"),
    ("num_experts", (None, 0, 1), "mixture of experts"),
    ("num_layers_per_virtual_pipeline_stage", (None,), "virtual pipeline stages (model0, model1, ...)"),
    ("virtual_pipeline_model_parallel_size", (None, 1), "virtual pipeline stages (model0, model1, ...)"),
    ("expert_model_parallel_size", (None, 1), "expert parallelism"),
    ("window_attn_skip_freq", (None,), "sliding windows on some layers only"),
    ("no_rope_freq", (None,), "rotary positions on some layers only"),
    ("softmax_type", (None, "vanilla"), "an attention softmax other than the usual one"),
)
NORMALIZATIONS = ("LayerNorm", "RMSNorm")


def check_supported(args, name: str) -> None:
    """Refuse, naming the field, an `args` whose architecture mega's GPT would run wrong."""
    if args is None:
        return
    for field, ok, what in UNSUPPORTED:
        value = getattr(args, field, None)
        if value not in ok:
            raise CheckpointError(f"{name}: args.{field}={value!r} ({what}); mega's GPT cannot run this architecture")
    norm = getattr(args, "normalization", None)
    if norm not in (None, *NORMALIZATIONS):
        raise CheckpointError(f"{name}: args.normalization={norm!r}; mega's GPT has LayerNorm and RMSNorm")


def check_tensors_and_args(state: Mapping, args, where: str) -> None:
    """`check_supported`, and an output layer of its own only when `args` untie it."""
    check_supported(args, where)
    if UNTIED in state and args is not None and hasattr(args, "untie_embeddings_and_output_weights") \
            and not args.untie_embeddings_and_output_weights:
        raise CheckpointError(f"{where}: has language_model.output_layer but args.untie_embeddings_and_output_weights"
                              " is false; the checkpoint contradicts itself")


def marked_by_architecture(state: Mapping, args) -> bool:
    """Whether the file holds a decoder of the Llama family's architecture (a gated MLP,
    RMSNorm, rotary or no positions, an untied output layer, grouped-query attention or
    no biases): GPT reads it, the family it marks names it."""
    if UNTIED in state:
        return True
    if args is None:
        return False
    return bool(getattr(args, "swiglu", False) or getattr(args, "normalization", None) == "RMSNorm"
                or getattr(args, "position_embedding_type", None) in ("rope", "none")
                or getattr(args, "use_rotary_position_embeddings", False)
                or getattr(args, "untie_embeddings_and_output_weights", False)
                or getattr(args, "group_query_attention", False)
                or getattr(args, "add_bias_linear", True) is False)


def activation_of(args) -> str:
    """mega's `activation` for Megatron's flags: `swiglu`; its fused bias-GELU and
    openai_gelu are the tanh approximation, else exact GELU."""
    if getattr(args, "swiglu", False):
        return "swiglu"
    return "gelu_tanh" if getattr(args, "openai_gelu", False) or getattr(args, "bias_gelu_fusion", False) else "gelu"


def require(args, field: str, fallback=None):
    value = getattr(args, field, None)
    if value is None:
        value = fallback
    if value is None:
        raise CheckpointError(f"args.{field} is missing; mega needs it to build the model")
    return value


def layer_count(state: Mapping) -> int:
    return 1 + max(int(m.group(1)) for k in state if (m := re.search(r"\.layers\.(\d+)\.", k)))


def positions_of(args) -> str:
    """mega's position_embedding_type for Megatron's fields (and the deprecated flags)."""
    kind = getattr(args, "position_embedding_type", None)
    if kind in ("rope", "none", "learned_absolute"):
        return kind
    if getattr(args, "use_rotary_position_embeddings", False):
        return "rope"
    return "learned_absolute" if getattr(args, "add_position_embedding", True) is not False else "none"


def architecture_table(state: Mapping, args) -> dict:
    """The architecture options (mega.plugins.models.architecture) `args` describe, with
    the tensors where they tell (an untied output layer)."""
    table = {"position_embedding_type": positions_of(args),
             "normalization": getattr(args, "normalization", None) or "LayerNorm",
             "add_bias_linear": getattr(args, "add_bias_linear", True) is not False,
             "share_embeddings_and_output_weights": not getattr(args, "untie_embeddings_and_output_weights", False)
             and UNTIED not in state,
             "activation": activation_of(args)}
    if getattr(args, "add_qkv_bias", False) and not table["add_bias_linear"]:
        table["add_qkv_bias"] = True
    heads = getattr(args, "num_attention_heads", None)
    if getattr(args, "group_query_attention", False):
        groups = getattr(args, "num_query_groups", None) or 1  # Megatron's --num-query-groups defaults to 1
        if groups != heads:
            table["num_query_groups"] = groups
    kv, hidden = getattr(args, "kv_channels", None), getattr(args, "hidden_size", None)
    if kv is not None and hidden and heads and kv * heads != hidden:
        table["kv_channels"] = kv
    if table["position_embedding_type"] == "rope":
        for ours, theirs in (("rotary_percent", "rotary_percent"), ("rotary_base", "rotary_base"),
                             ("rotary_interleaved", "rotary_interleaved"),
                             ("seq_len_interpolation_factor", "rotary_seq_len_interpolation_factor")):
            if getattr(args, theirs, None) is not None:
                table[ours] = getattr(args, theirs)
        for key in ("rotary_base", "rotary_percent", "seq_len_interpolation_factor"):
            if key in table:
                table[key] = float(table[key])
        if getattr(args, "use_rope_scaling", False):
            table.update(rope_scaling=True, rope_scaling_factor=float(getattr(args, "rope_scaling_factor", None) or 8.0),
                         **dict(getattr(args, "mega_rope_scaling", None) or {}))
    window = getattr(args, "window_size", None)
    if window is not None:
        table["window_size"] = [int(window[0]), int(window[1])]
    eps = getattr(args, "norm_epsilon", None) or getattr(args, "layernorm_epsilon", None)
    if eps:
        table["layernorm_epsilon"] = float(eps)
    return table


def model_table(state: Mapping, args, where: str) -> dict:
    """`model.*` of mega's gpt for the merged tensors (mega's names) and `args`."""
    word, positions = state.get(WORD), state.get(POSITIONS)
    arch = architecture_table(state, args)
    learned = arch["position_embedding_type"] == "learned_absolute"
    if word is None or (learned and positions is None) or f"{LAYER0}self_attention.query_key_value.weight" not in state:
        what = "word/position embeddings and layers" if learned else "word embeddings and layers"
        raise CheckpointError(f"{where}: holds no GPT language model ({what})")
    hidden = require(args, "hidden_size", word.shape[1])
    layers = layer_count(state)
    num_layers = require(args, "num_layers", layers)
    if num_layers != layers:
        raise CheckpointError(f"{where}: args.num_layers={num_layers} but the files hold {layers} layers")
    if learned:
        max_pos = positions.shape[0]
    else:  # no table to measure: the limit args give
        max_pos = require(args, "max_position_embeddings", getattr(args, "seq_length", None))
    fc1 = state[f"{LAYER0}mlp.dense_h_to_4h.weight"].shape[0]
    model = {
        "name": "gpt", "num_layers": num_layers, "hidden_size": hidden,
        "num_attention_heads": require(args, "num_attention_heads"),
        "ffn_hidden_size": fc1 // 2 if arch["activation"] == "swiglu" else fc1,
        "max_position_embeddings": max_pos, "seq_length": min(getattr(args, "seq_length", None) or max_pos, max_pos),
        "layernorm_epsilon": 1e-5,
    }
    model.update(arch)
    for key in ("hidden_dropout", "attention_dropout", "init_method_std"):
        if isinstance(getattr(args, key, None), float):
            model[key] = getattr(args, key)
    return model


def _integral(value):
    """Megatron-LM's int-typed flags (--rotary-base, --rotary-seq-len-interpolation-factor)."""
    return int(value) if value is not None and float(value).is_integer() else value


def architecture_args(model: dict) -> dict:
    """Megatron-LM's architecture fields for a mega gpt `model` table (what
    `--use-checkpoint-args` copies and check_checkpoint_args compares): megatron-core's
    names, with the deprecated spellings older readers use (docs/llama.md)."""
    hidden, heads = model.get("hidden_size"), model.get("num_attention_heads")
    activation = model.get("activation", "gelu")
    gated = activation == "swiglu"
    positions = model.get("position_embedding_type", "learned_absolute")
    groups = model.get("num_query_groups")
    eps = model.get("layernorm_epsilon", 1e-5)
    bias = model.get("add_bias_linear", True)
    fields = dict(
        num_layers=model.get("num_layers"), hidden_size=hidden,
        ffn_hidden_size=model.get("ffn_hidden_size") or (default_ffn(hidden, gated) if hidden else None),
        num_attention_heads=heads,
        kv_channels=model.get("kv_channels") or (hidden // heads if hidden and heads else None),
        group_query_attention=groups not in (None, heads), num_query_groups=groups or heads,
        max_position_embeddings=model.get("max_position_embeddings") or model.get("seq_length"),
        seq_length=model.get("seq_length"),
        position_embedding_type=positions, add_position_embedding=positions == "learned_absolute",
        use_rotary_position_embeddings=positions == "rope",
        untie_embeddings_and_output_weights=not model.get("share_embeddings_and_output_weights", True),
        add_bias_linear=bias, add_qkv_bias=bool(bias or model.get("add_qkv_bias", False)),
        swiglu=gated, squared_relu=False, normalization=model.get("normalization", "LayerNorm"),
        apply_layernorm_1p=False, apply_residual_connection_post_layernorm=False,
        layernorm_epsilon=eps, norm_epsilon=eps,
        # activation: mega's "gelu_tanh" is Megatron's openai_gelu (HF: gelu_new); "gelu" is erf
        bias_gelu_fusion=False, openai_gelu=activation == "gelu_tanh",
        hidden_dropout=model.get("hidden_dropout"), attention_dropout=model.get("attention_dropout"),
        init_method_std=model.get("init_method_std"),
        window_size=tuple(model["window_size"]) if model.get("window_size") is not None else None,
    )
    if positions == "rope":
        fields.update(rotary_percent=model.get("rotary_percent", 1.0), rotary_base=_integral(model.get("rotary_base", 10000)),
                      rotary_interleaved=model.get("rotary_interleaved", False),
                      rotary_seq_len_interpolation_factor=_integral(model.get("seq_len_interpolation_factor")),
                      use_rope_scaling=model.get("rope_scaling", False),
                      rope_scaling_factor=model.get("rope_scaling_factor", 8.0))
        if model.get("rope_scaling"):  # megatron-core fixes these at 1, 4, 8192: mega's own field
            fields["mega_rope_scaling"] = {k: model.get(k, d) for k, d in (
                ("low_freq_factor", 1.0), ("high_freq_factor", 4.0), ("old_context_len", 8192))}
    return fields


# the architecture keys a resumed run must agree with where the weights load either way
RESUME_KEYS = ("position_embedding_type", "rotary_percent", "rotary_base", "rotary_interleaved",
               "seq_len_interpolation_factor", "rope_scaling", "rope_scaling_factor", "window_size", "normalization")


def check_resume(args, model_config, where: str) -> None:
    """A resumed `megatron` checkpoint must have been trained with the run's activation and
    attention: the weights load into either GELU, any RoPE base or scaling, any window, so
    the kernel's strict load cannot tell."""
    if args is None:
        return
    if hasattr(args, "openai_gelu"):
        saved, ours = activation_of(args), model_config.activation
        if saved != ours:
            raise ConfigError(f"{where}: was trained with activation {saved!r} (args.openai_gelu={args.openai_gelu},"
                              f" bias_gelu_fusion={getattr(args, 'bias_gelu_fusion', None)}) but model.activation={ours!r};"
                              f" set model.activation={saved!r} to resume it, or start a new run")
    if not hasattr(args, "position_embedding_type"):
        return
    saved = architecture_table({}, args)
    for key in RESUME_KEYS:
        if key in saved and hasattr(model_config, key):
            ours = getattr(model_config, key)
            ours = list(ours) if isinstance(ours, tuple) else ours
            if saved[key] != ours:
                raise ConfigError(f"{where}: was trained with {key}={saved[key]!r} but model.{key}={ours!r}; set"
                                  f" model.{key}={saved[key]!r} to resume it, or start a new run")
