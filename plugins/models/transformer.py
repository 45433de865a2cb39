"""Pre-LayerNorm transformer blocks shared by the model plugins, on the kernel's
tensor-parallel layers.

Parameter names follow Megatron-LM's legacy layout (`self_attention.query_key_value`,
`mlp.dense_h_to_4h`, ...) so Megatron-LM checkpoints map key for key. The
fused QKV weight is stored per head as [num_heads, 3, head_dim] rows (checkpoint_version
>= 2.0), which is also what a column-parallel split by heads needs: each rank holds whole
heads with their Q, K and V.
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from mega.errors import ConfigError
from mega.runtime.parallel import current
from mega.runtime.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    get_rng_tracker,
    mark_replicated,
)


@attrs.frozen(kw_only=True)
class BlockConfig:
    """Everything a transformer block needs, read by name from a model's config section
    (`model.*` for GPT, `model.encoder.*` / `model.decoder.*` for encoder-decoders), so
    blocks take one argument as nanoGPT's `Block(config)` and megatron-core's
    `TransformerLayer(config, ...)` do. `where` is the section's dotted path, for errors."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    ffn_hidden_size: Optional[int] = None  # None: 4 x hidden_size
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    layernorm_epsilon: float = 1e-5
    activation: str = "gelu"  # "gelu" (exact, erf) or "gelu_tanh" (Megatron's fused bias-GELU, GPT-2's gelu_new)
    init_method_std: float = 0.02
    attention_backend: str = "auto"  # the SDPA kernel: "auto" (torch picks), "flash", "cudnn", "efficient", "math"
    where: str = "model"

    @classmethod
    def of(cls, section, **overrides) -> "BlockConfig":
        """The block keys of a config section (attributes of the same names)."""
        names = [a.name for a in attrs.fields(cls) if a.name not in overrides and hasattr(section, a.name)]
        return cls(**{n: getattr(section, n) for n in names}, **overrides)

    @property
    def ffn(self) -> int:
        return self.ffn_hidden_size or 4 * self.hidden_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def init_method(self, t: torch.Tensor) -> torch.Tensor:
        return nn.init.normal_(t, 0.0, self.init_method_std)

    def output_init_method(self, t: torch.Tensor) -> torch.Tensor:
        """Megatron's init of the output projection of each residual branch: std / sqrt(2L)."""
        return nn.init.normal_(t, 0.0, self.init_method_std / math.sqrt(2.0 * self.num_layers))


def check_shape(cfg: BlockConfig, tp: int = 1, pp: int = 1) -> None:
    """Shape mistakes as config errors naming the keys, before any tensor is allocated."""
    w = cfg.where
    for key in ("num_layers", "hidden_size", "num_attention_heads"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{w}.{key}: must be at least 1, got {getattr(cfg, key)}")
    for key in ("hidden_dropout", "attention_dropout"):
        if not 0.0 <= getattr(cfg, key) < 1.0:
            raise ConfigError(f"{w}.{key}: must be in [0, 1), got {getattr(cfg, key)}")
    if cfg.hidden_size % cfg.num_attention_heads:
        raise ConfigError(f"{w}.hidden_size={cfg.hidden_size} is not divisible by {w}.num_attention_heads={cfg.num_attention_heads}")
    if cfg.num_attention_heads % tp:
        raise ConfigError(f"{w}.num_attention_heads={cfg.num_attention_heads} is not divisible by model.tensor_model_parallel_size={tp}")
    if cfg.ffn % tp:
        raise ConfigError(f"{w}.ffn_hidden_size={cfg.ffn} is not divisible by model.tensor_model_parallel_size={tp}")
    if cfg.activation not in ACTIVATIONS:
        raise ConfigError(f"{w}.activation: expected one of {', '.join(map(repr, ACTIVATIONS))}, got {cfg.activation!r}")
    if cfg.attention_backend not in ATTENTION_BACKENDS:
        raise ConfigError(f"{w}.attention_backend: expected one of {', '.join(map(repr, ATTENTION_BACKENDS))},"
                          f" got {cfg.attention_backend!r}")
    if cfg.num_layers % pp:
        raise ConfigError(f"{w}.num_layers={cfg.num_layers} is not divisible by model.pipeline_model_parallel_size={pp}")


class Embedding(nn.Module):
    """Word (vocab-parallel) + learned position embeddings, then dropout (Megatron's
    `language_model.embedding`)."""

    def __init__(self, vocab: int, cfg: BlockConfig, max_positions: int):
        super().__init__()
        self.word_embeddings = VocabParallelEmbedding(vocab, cfg.hidden_size, cfg.init_method)
        self.position_embeddings = nn.Embedding(max_positions, cfg.hidden_size)
        cfg.init_method(self.position_embeddings.weight.data)
        self.embedding_dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, tokens: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.embedding_dropout(self.word_embeddings(tokens) + self.position_embeddings(position_ids))


class KVCache:
    """Pre-allocated keys and values of every layer for incremental decoding."""

    def __init__(self, num_layers: int, batch: int, heads: int, max_len: int, head_dim: int, device, dtype):
        shape = (batch, heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.length = 0  # positions already filled
        self.max_len = max_len

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store this step's k, v for `layer`; return all keys and values so far."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {end} requested")
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


class SelfAttention(nn.Module):
    def __init__(self, cfg: BlockConfig, layer_number: int):
        super().__init__()
        self.num_heads = cfg.num_attention_heads // current().tp_size  # heads on this rank
        self.head_dim = cfg.head_dim
        self.attention_dropout = cfg.attention_dropout
        self.attention_backend = cfg.attention_backend
        self.layer_number = layer_number  # index into a KV cache (local to this pipeline stage)
        self.query_key_value = ColumnParallelLinear(cfg.hidden_size, 3 * cfg.hidden_size, cfg.init_method)
        self.dense = RowParallelLinear(cfg.hidden_size, cfg.hidden_size, cfg.output_init_method)

    def forward(self, x: torch.Tensor, cache: Optional[KVCache] = None, key_mask: Optional[torch.Tensor] = None,
                causal: bool = True) -> torch.Tensor:
        """`key_mask` [b, s] (True = attend) masks padded keys; `causal=False` for encoders."""
        b, s, _ = x.shape
        qkv = self.query_key_value(x).view(b, s, self.num_heads, 3, self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(dim=3))  # each [b, heads, s, head_dim]
        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.append(self.layer_number, k, v)
        mask = None
        if causal and past:  # new queries see every cached position and the causal part of their own
            mask = torch.ones(s, past + s, dtype=torch.bool, device=x.device).tril(diagonal=past)
        if key_mask is not None:
            keys = key_mask[:, None, None, :].bool()
            if causal and mask is None:
                mask = torch.ones(s, s, dtype=torch.bool, device=x.device).tril()
            mask = keys if mask is None else mask & keys
        y = attend(q, k, v, mask, self.attention_dropout if self.training else 0.0,
                   is_causal=causal and mask is None, backend=self.attention_backend)
        return self.dense(y.transpose(1, 2).reshape(b, s, -1))


# model `attention_backend` -> torch's SDPA backend (megatron-core's flash / fused / unfused
# attention choices, on the kernels torch ships); "auto" lets torch pick per call.
ATTENTION_BACKENDS = {"auto": None, "flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION",
                      "efficient": "EFFICIENT_ATTENTION", "math": "MATH"}
CPU_ATTENTION_BACKENDS = ("auto", "math")


def sdpa_backend(backend: str, device: torch.device):
    """A context that restricts SDPA to `backend` (a no-op for "auto"). The fused kernels
    other than math are CUDA kernels: asked for on another device, a ConfigError."""
    name = ATTENTION_BACKENDS[backend]
    if name is None:
        return contextlib.nullcontext()
    if device.type != "cuda" and backend not in CPU_ATTENTION_BACKENDS:
        raise ConfigError(f"model.attention_backend={backend!r} needs a CUDA device; on {device.type} use \"auto\" or \"math\"")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(getattr(SDPBackend, name))


def attend(q, k, v, mask, dropout: float, is_causal: bool = False, backend: str = "auto") -> torch.Tensor:
    """SDPA with a boolean mask (or SDPA's own causal mask); rows whose keys are all masked
    give zeros, not NaN. Under tensor parallelism this rank's heads draw their own dropout
    masks (the model-parallel RNG tracker). `backend`: ATTENTION_BACKENDS."""
    rng = get_rng_tracker().fork() if dropout and current().tp_size > 1 else contextlib.nullcontext()
    with rng, sdpa_backend(backend, q.device):
        if mask is not None:
            empty = ~mask.any(dim=-1, keepdim=True)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask | empty, dropout_p=dropout)
            return y.masked_fill(empty, 0.0)
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=is_causal)


class CrossAttention(nn.Module):
    """Queries from x, keys and values from a memory (Megatron's `inter_attention`)."""

    def __init__(self, cfg: BlockConfig, memory_size: Optional[int] = None):
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_attention_heads // current().tp_size, cfg.head_dim
        self.attention_dropout = cfg.attention_dropout
        self.attention_backend = cfg.attention_backend
        self.query = ColumnParallelLinear(cfg.hidden_size, cfg.hidden_size, cfg.init_method)
        self.key_value = ColumnParallelLinear(memory_size or cfg.hidden_size, 2 * cfg.hidden_size, cfg.init_method)
        self.dense = RowParallelLinear(cfg.hidden_size, cfg.hidden_size, cfg.output_init_method)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, memory_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.query(x).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        kv = self.key_value(memory).view(b, memory.shape[1], self.num_heads, 2, self.head_dim)
        k, v = (t.transpose(1, 2) for t in kv.unbind(dim=3))
        mask = None if memory_mask is None else memory_mask[:, None, None, :].bool()
        y = attend(q, k, v, mask, self.attention_dropout if self.training else 0.0, backend=self.attention_backend)
        return self.dense(y.transpose(1, 2).reshape(b, s, -1))


ACTIVATIONS = {"gelu": "none", "gelu_tanh": "tanh"}  # model `activation` -> F.gelu's `approximate`


class MLP(nn.Module):
    """dense_h_to_4h, GELU, dense_4h_to_h. `activation = "gelu"` is the exact (erf) GELU,
    Megatron-LM's with `bias_gelu_fusion` and `openai_gelu` off; `"gelu_tanh"` is the tanh
    approximation that Megatron's fused bias-GELU kernel (its default) and `openai_gelu`
    compute, and GPT-2's `gelu_new`."""

    def __init__(self, cfg: BlockConfig):
        super().__init__()
        self.approximate = ACTIVATIONS[cfg.activation]
        self.dense_h_to_4h = ColumnParallelLinear(cfg.hidden_size, cfg.ffn, cfg.init_method)
        self.dense_4h_to_h = RowParallelLinear(cfg.ffn, cfg.hidden_size, cfg.output_init_method)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x), approximate=self.approximate))


class TransformerLayer(nn.Module):
    """x + attn(LN(x)), then x + mlp(LN(x)), with dropout on each residual branch."""

    def __init__(self, cfg: BlockConfig, layer_number: int):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_epsilon)
        self.self_attention = SelfAttention(cfg, layer_number)
        self.post_attention_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_epsilon)
        self.mlp = MLP(cfg)
        self.hidden_dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, x: torch.Tensor, cache: Optional[KVCache] = None, key_mask: Optional[torch.Tensor] = None,
                causal: bool = True) -> torch.Tensor:
        x = x + self.hidden_dropout(self.self_attention(self.input_layernorm(x), cache, key_mask, causal))
        return x + self.hidden_dropout(self.mlp(self.post_attention_layernorm(x)))


class TransformerStack(nn.Module):
    """The `encoder` of Megatron's language_model: layers, then a final LayerNorm on the
    last pipeline stage. `layer_offset` is the global index of the first layer here."""

    def __init__(self, cfg: BlockConfig, keep: Optional[range] = None, final_layernorm: bool = True):
        """`keep`: the global indices of the layers this pipeline stage holds (all by default).
        Every layer is still built in order and the others dropped, so each stage draws the
        same initial weights as the single-stage model."""
        super().__init__()
        keep = range(cfg.num_layers) if keep is None else keep
        self.layer_offset = keep.start
        layers = []
        for i in range(cfg.num_layers):  # build each layer, keep this stage's (memory: one at a time)
            layer = TransformerLayer(cfg, i - keep.start)
            if i in keep:
                layers.append(layer)
        self.layers = nn.ModuleList(layers)
        self.final_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_epsilon) if final_layernorm else None

    def forward(self, x: torch.Tensor, cache: Optional[KVCache] = None, key_mask: Optional[torch.Tensor] = None,
                causal: bool = True) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, cache, key_mask, causal)
        if cache is not None:
            cache.length += x.shape[1]
        return self.final_layernorm(x) if self.final_layernorm is not None else x


def padded_vocab_size(vocab_size: int, divisible_by: int, tensor_parallel: int = 1) -> int:
    """Pad the vocabulary to a multiple of divisible_by x TP, as Megatron does."""
    multiple = divisible_by * tensor_parallel
    return ((vocab_size + multiple - 1) // multiple) * multiple


class TiedWordEmbeddingStages:
    """Megatron's tied word embedding across pipeline stages, for models whose
    `language_model` holds the `embedding` on the first stage (and, elsewhere, a
    `head_weight_init` copy of its initial values) and whose output layer reuses it.

    On a last stage without the embedding, `word_embeddings_for_head` is that stage's copy
    (Megatron's name; the kernel sums its gradient with the first stage's). `finish_stages`
    also marks replicated parameters and sets what resharding across pipeline sizes reads
    (`pipeline_layer_offset`, `state_aliases`)."""

    def finish_stages(self) -> None:
        if self.post_process and not self.pre_process:
            self.word_embeddings_for_head = nn.Module()
            self.word_embeddings_for_head.weight = nn.Parameter(self.language_model.head_weight_init.clone())
            self.word_embeddings_for_head.weight.partition_dim = 0
            self.word_embeddings_for_head.weight.shared_embedding_copy = True
        self.language_model.head_weight_init = None
        mark_replicated(self)
        self.pipeline_layer_offset = self.language_model.encoder.layer_offset
        self.state_aliases = ({"word_embeddings_for_head.weight": "language_model.embedding.word_embeddings.weight"}
                              if hasattr(self, "word_embeddings_for_head") else {})

    def shared_embedding_or_output_weight(self) -> torch.Tensor:
        """The word-embedding matrix that also produces the logits (megatron-core's name)."""
        if self.pre_process:
            return self.language_model.embedding.word_embeddings.weight
        return self.word_embeddings_for_head.weight
