"""GPT in Megatron-LM's legacy checkpoints: the architecture fields of `args` both ways,
what mega's GPT cannot run, and the model table an imported checkpoint gets.

mega's parameter names are Megatron-LM's legacy ones (`language_model.embedding...`,
`language_model.encoder.layers.N...`), so tensors map key for key; the `megatron` format
reads and writes the files, merges and splits the shards and fills in the vocabulary,
tokenizer, parallel-layout and training fields of `args`.
"""
from __future__ import annotations

import re
from typing import Mapping

from mega.errors import CheckpointError, ConfigError

WORD = "language_model.embedding.word_embeddings.weight"
POSITIONS = "language_model.embedding.position_embeddings.weight"
LAYER0 = "language_model.encoder.layers.0."
UNTIED = "language_model.output_layer.weight"

# args fields whose values mega's GPT cannot honour: field -> (acceptable values, what it means)
UNSUPPORTED = (
    ("swiglu", (None, False), "SwiGLU MLP"),
    ("squared_relu", (None, False), "squared-ReLU MLP"),
    ("position_embedding_type", (None, "learned_absolute"), "position embeddings other than learned absolute"),
    ("add_position_embedding", (None, True), "no position embeddings"),
    ("use_rotary_position_embeddings", (None, False), "rotary position embeddings"),
    ("normalization", (None, "LayerNorm"), "a normalization other than LayerNorm"),
    ("apply_layernorm_1p", (None, False), "LayerNorm with 1 + weight"),
    ("untie_embeddings_and_output_weights", (None, False), "an output layer untied from the word embeddings"),
    ("group_query_attention", (None, False), "group-query attention"),
    ("add_bias_linear", (None, True), "linear layers without biases"),
    ("apply_residual_connection_post_layernorm", (None, False), "residual connections after the LayerNorm"),
    ("num_experts", (None, 0, 1), "mixture of experts"),
    ("num_layers_per_virtual_pipeline_stage", (None,), "virtual pipeline stages (model0, model1, ...)"),
    ("virtual_pipeline_model_parallel_size", (None, 1), "virtual pipeline stages (model0, model1, ...)"),
    ("expert_model_parallel_size", (None, 1), "expert parallelism"),
)


def check_supported(args, name: str) -> None:
    """Refuse, naming the field, an `args` whose architecture mega's GPT would run wrong."""
    if args is None:
        return
    for field, ok, what in UNSUPPORTED:
        value = getattr(args, field, None)
        if value not in ok:
            raise CheckpointError(f"{name}: args.{field}={value!r} ({what}); mega's GPT cannot run this architecture")
    hidden, heads = getattr(args, "hidden_size", None), getattr(args, "num_attention_heads", None)
    groups = getattr(args, "num_query_groups", None)
    if groups not in (None, heads) and getattr(args, "group_query_attention", False):
        raise CheckpointError(f"{name}: args.num_query_groups={groups} (group-query attention); mega's GPT cannot run it")
    kv = getattr(args, "kv_channels", None)
    if kv is not None and hidden and heads and kv != hidden // heads:
        raise CheckpointError(f"{name}: args.kv_channels={kv} differs from hidden_size / num_attention_heads ="
                              f" {hidden // heads}; mega's GPT cannot run it")


def check_tensors_and_args(state: Mapping, args, where: str) -> None:
    """`check_supported`, and no output layer of its own (mega ties it to the embedding)."""
    check_supported(args, where)
    if UNTIED in state:
        raise CheckpointError(f"{where}: has language_model.output_layer (an output layer untied from the word"
                              " embeddings); mega's GPT cannot run this architecture")


def activation_of(args) -> str:
    """mega's `activation` for Megatron's flags: its fused bias-GELU and openai_gelu are the
    tanh approximation, else exact GELU."""
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


def model_table(state: Mapping, args, where: str) -> dict:
    """`model.*` of mega's gpt for the merged tensors (mega's names) and `args`."""
    word, positions = state.get(WORD), state.get(POSITIONS)
    if word is None or positions is None or f"{LAYER0}self_attention.query_key_value.weight" not in state:
        raise CheckpointError(f"{where}: holds no GPT language model (word/position embeddings and layers)")
    hidden = require(args, "hidden_size", word.shape[1])
    layers = layer_count(state)
    num_layers = require(args, "num_layers", layers)
    if num_layers != layers:
        raise CheckpointError(f"{where}: args.num_layers={num_layers} but the files hold {layers} layers")
    max_pos = positions.shape[0]
    model = {
        "name": "gpt", "num_layers": num_layers, "hidden_size": hidden,
        "num_attention_heads": require(args, "num_attention_heads"),
        "ffn_hidden_size": state[f"{LAYER0}mlp.dense_h_to_4h.weight"].shape[0],
        "max_position_embeddings": max_pos, "seq_length": min(getattr(args, "seq_length", None) or max_pos, max_pos),
        "layernorm_epsilon": getattr(args, "layernorm_epsilon", None) or 1e-5,
        "activation": activation_of(args),
    }
    for key in ("hidden_dropout", "attention_dropout", "init_method_std"):
        if isinstance(getattr(args, key, None), float):
            model[key] = getattr(args, key)
    return model


def architecture_args(model: dict) -> dict:
    """Megatron-LM's architecture fields for a mega gpt `model` table (what
    `--use-checkpoint-args` copies and check_checkpoint_args compares)."""
    hidden, heads = model.get("hidden_size"), model.get("num_attention_heads")
    activation = model.get("activation", "gelu")
    return dict(
        num_layers=model.get("num_layers"), hidden_size=hidden,
        ffn_hidden_size=model.get("ffn_hidden_size") or (4 * hidden if hidden else None),
        num_attention_heads=heads, kv_channels=hidden // heads if hidden and heads else None,
        group_query_attention=False, num_query_groups=heads,
        max_position_embeddings=model.get("max_position_embeddings") or model.get("seq_length"),
        seq_length=model.get("seq_length"),
        position_embedding_type="learned_absolute", add_position_embedding=True,
        untie_embeddings_and_output_weights=False, add_bias_linear=True, add_qkv_bias=False,
        swiglu=False, squared_relu=False, normalization="LayerNorm", apply_layernorm_1p=False,
        apply_residual_connection_post_layernorm=False, layernorm_epsilon=model.get("layernorm_epsilon", 1e-5),
        # activation: mega's "gelu_tanh" is Megatron's openai_gelu (HF: gelu_new); "gelu" is erf
        bias_gelu_fusion=False, openai_gelu=activation == "gelu_tanh",
        hidden_dropout=model.get("hidden_dropout"), attention_dropout=model.get("attention_dropout"),
        init_method_std=model.get("init_method_std"),
    )


def check_resume(args, model_config, where: str) -> None:
    """A resumed `megatron` checkpoint must have been trained with the run's activation:
    the weights load into either GELU, so the kernel's strict load cannot tell."""
    if args is None or not hasattr(args, "openai_gelu"):
        return
    saved, ours = activation_of(args), model_config.activation
    if saved != ours:
        raise ConfigError(f"{where}: was trained with activation {saved!r} (args.openai_gelu={args.openai_gelu},"
                          f" bias_gelu_fusion={getattr(args, 'bias_gelu_fusion', None)}) but model.activation={ours!r};"
                          f" set model.activation={saved!r} to resume it, or start a new run")
