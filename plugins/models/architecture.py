"""The architecture options of the decoder blocks that megatron-core builds from one
`GPTModel` (Llama 2/3, Mistral, Qwen2 and GPT-2 alike), under megatron-core / NeMo names,
and their checks. Each is orthogonal; the defaults are GPT-2's shape, so a config that
sets none of them builds the model and checkpoints it always did.

| key | what | Megatron-LM flag |
|---|---|---|
| position_embedding_type | "learned_absolute" table, "rope", or "none" (NoPE) | --position-embedding-type |
| rotary_percent, rotary_base, rotary_interleaved | RoPE: share of head dims rotated, base, pairing | --rotary-percent, --rotary-base, --rotary-interleaved |
| seq_len_interpolation_factor | linear RoPE scaling | --rotary-seq-len-interpolation-factor |
| rope_scaling, rope_scaling_factor, low_freq_factor, high_freq_factor, old_context_len | Llama 3.1 RoPE scaling | --use-rope-scaling, --rope-scaling-factor |
| normalization | "LayerNorm" or "RMSNorm" | --normalization |
| num_query_groups | key/value heads (grouped-query; 1: multi-query) | --group-query-attention --num-query-groups |
| kv_channels | head dim (default hidden_size / num_attention_heads) | --kv-channels |
| add_bias_linear, add_qkv_bias | biases of every linear / of QKV only (Qwen2) | --disable-bias-linear, --add-qkv-bias |
| window_size | sliding-window attention [left, 0]: a query sees itself and `left` keys before | --window-size |

`activation = "swiglu"` (gated SiLU MLP, Megatron's --swiglu) and the untied output layer
(`share_embeddings_and_output_weights`) are the model config's own keys. The rules are
megatron-core's `TransformerConfig.__post_init__` and Megatron-LM's `validate_args`, each a
ConfigError naming the keys (docs/llama.md).
"""
from __future__ import annotations

from typing import List, Literal, Optional

from attrs import define

from mega.config import key
from mega.errors import ConfigError

POSITION_EMBEDDINGS = ("learned_absolute", "rope", "none")
NORMALIZATIONS = ("LayerNorm", "RMSNorm")
GATED = ("swiglu",)  # activations with a gated MLP (fc1 = [gate; up])
ROPE_DEFAULTS = {"rotary_percent": 1.0, "rotary_base": 10000.0, "rotary_interleaved": False,
                 "seq_len_interpolation_factor": None, "rope_scaling": False}


@define(kw_only=True, slots=False)
class ArchitectureKeys:
    """A model config's architecture options (module docstring); a mixin of GPTConfig."""

    position_embedding_type: Literal["learned_absolute", "rope", "none"] = key("learned_absolute",
            help="positions: a learned table added to the embedding, rotary embeddings in every attention layer, or none (--position-embedding-type)")
    rotary_percent: float = key(1.0,
            help="with rope: the share of each head's dims that rotate (NeMo: rotary_percentage; HF: partial_rotary_factor)")
    rotary_base: float = key(10000.0, help="with rope: the frequency base (HF: rope_theta)")
    rotary_interleaved: bool = key(False,
            help="with rope: rotate dims (2i, 2i+1) together (Meta's layout) instead of (i, i+d/2) (HF's)")
    seq_len_interpolation_factor: Optional[float] = key(None,
            help='with rope: linear scaling, positions divided by it (HF rope_scaling type "linear")')
    rope_scaling: bool = key(False,
            help="with rope: Llama 3.1's frequency scaling (--use-rope-scaling; HF rope_scaling type \"llama3\")")
    rope_scaling_factor: float = key(8.0, help="with rope_scaling: the factor (Llama 3.1: 8, 3.2: 32)")
    low_freq_factor: float = key(1.0, help="with rope_scaling (HF rope_scaling.low_freq_factor)")
    high_freq_factor: float = key(4.0, help="with rope_scaling (HF rope_scaling.high_freq_factor)")
    old_context_len: int = key(8192, help="with rope_scaling (HF rope_scaling.original_max_position_embeddings)")
    normalization: Literal["LayerNorm", "RMSNorm"] = key("LayerNorm",
            help="the blocks' and the final norm (--normalization)")
    num_query_groups: Optional[int] = key(None,
            help="key/value heads for grouped-query attention (1: multi-query); unset: num_attention_heads (HF: num_key_value_heads)")
    kv_channels: Optional[int] = key(None, help="head dim; unset: hidden_size / num_attention_heads (HF: head_dim)")
    add_bias_linear: bool = key(True,
            help="biases in the QKV, attention output and MLP linears (NeMo: bias; --disable-bias-linear)")
    add_qkv_bias: bool = key(False,
            help="a bias in the QKV linear even without add_bias_linear (Qwen2; NeMo: qkv_bias)")
    window_size: Optional[List[int]] = key(None,
            help="sliding-window attention [left, 0]: each query sees itself and `left` keys before (HF sliding_window = left + 1)")


def default_ffn(hidden_size: int, gated: bool) -> int:
    """ffn_hidden_size when unset: 4h, or with a gated MLP Megatron-LM's `int(8h/3 / 64) * 64`
    (the same parameter count in three matrices instead of two)."""
    return int(4 * hidden_size * 2 / 3 / 64) * 64 if gated else 4 * hidden_size


def check_architecture(cfg, where: str = "model", tp: int = 1) -> None:
    """The rules among the architecture keys of `cfg` (a block config) at tensor-parallel
    size `tp`, each a ConfigError naming the keys."""
    w = cfg.where if hasattr(cfg, "where") else where
    if cfg.position_embedding_type not in POSITION_EMBEDDINGS:
        raise ConfigError(f"{w}.position_embedding_type: expected one of {', '.join(map(repr, POSITION_EMBEDDINGS))},"
                          f" got {cfg.position_embedding_type!r}")
    if cfg.normalization not in NORMALIZATIONS:
        raise ConfigError(f"{w}.normalization: expected one of {', '.join(map(repr, NORMALIZATIONS))}, got"
                          f" {cfg.normalization!r} (NeMo's lower-case names are read by `mega import`)")
    heads = cfg.num_attention_heads
    if cfg.kv_channels is None and cfg.hidden_size % heads:
        raise ConfigError(f"{w}.hidden_size={cfg.hidden_size} is not divisible by {w}.num_attention_heads={heads};"
                          f" set {w}.kv_channels for a head dim of its own")
    if cfg.kv_channels is not None and cfg.kv_channels < 1:
        raise ConfigError(f"{w}.kv_channels: must be at least 1, got {cfg.kv_channels}")
    groups = cfg.num_query_groups
    if groups is not None:
        if groups < 1 or heads % groups:
            raise ConfigError(f"{w}.num_query_groups={groups}: must divide {w}.num_attention_heads={heads}")
        if groups % tp:
            raise ConfigError(f"{w}.num_query_groups={groups} is not divisible by model.tensor_model_parallel_size={tp}"
                              " (each rank holds whole key/value heads)")
    if cfg.position_embedding_type != "rope":
        for key, default in ROPE_DEFAULTS.items():
            if getattr(cfg, key) != default:
                raise ConfigError(f"{w}.{key}={getattr(cfg, key)!r} needs {w}.position_embedding_type = \"rope\"")
    else:
        if not 0.0 < cfg.rotary_percent <= 1.0:
            raise ConfigError(f"{w}.rotary_percent: must be in (0, 1], got {cfg.rotary_percent}")
        head_dim = cfg.kv_channels or cfg.hidden_size // heads
        rotated = int(head_dim * cfg.rotary_percent)
        if rotated < 2 or rotated % 2:
            raise ConfigError(f"{w}.rotary_percent={cfg.rotary_percent} rotates {rotated} of {head_dim} head dims;"
                              " it must be an even number of at least 2")
        if cfg.rotary_base <= 0:
            raise ConfigError(f"{w}.rotary_base: must be positive, got {cfg.rotary_base}")
        if cfg.rope_scaling and cfg.seq_len_interpolation_factor is not None:
            raise ConfigError(f"{w}.rope_scaling and {w}.seq_len_interpolation_factor are two RoPE scalings; set one")
        if cfg.seq_len_interpolation_factor is not None and cfg.seq_len_interpolation_factor <= 0:
            raise ConfigError(f"{w}.seq_len_interpolation_factor: must be positive, got {cfg.seq_len_interpolation_factor}")
        if cfg.rope_scaling and not (cfg.rope_scaling_factor > 0 and cfg.high_freq_factor > cfg.low_freq_factor > 0
                                     and cfg.old_context_len > 0):
            raise ConfigError(f"{w}.rope_scaling: needs rope_scaling_factor > 0, high_freq_factor > low_freq_factor > 0"
                              f" and old_context_len > 0 (got {cfg.rope_scaling_factor}, {cfg.high_freq_factor},"
                              f" {cfg.low_freq_factor}, {cfg.old_context_len})")
    if cfg.window_size is not None:
        window = list(cfg.window_size)
        if len(window) != 2 or window[1] != 0 or window[0] < 0:
            raise ConfigError(f"{w}.window_size={window}: expected [left, 0] with left >= 0 (a causal window: each"
                              " query sees itself and `left` keys before it)")
