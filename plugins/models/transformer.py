"""Pre-LayerNorm transformer blocks shared by the model plugins, on the kernel's
tensor-parallel layers.

Parameter names follow Megatron-LM's legacy layout (`self_attention.query_key_value`,
`mlp.dense_h_to_4h`, ...) so Megatron-LM checkpoints map key for key. The
fused QKV weight is stored per head as [num_heads, 3, head_dim] rows (checkpoint_version
>= 2.0), which is also what a column-parallel split by heads needs: each rank holds whole
heads with their Q, K and V.

Activation memory (docs/parallelism.md): `full` recomputation runs the stack's layers through
`mega.runtime.recompute.run_layers`; `selective` recomputation checkpoints the core
attention (`core_attn`) and the MLP (`mlp`) inside the modules themselves. With
`sequence_parallel`, the residual stream between the column- and row-parallel linears is
this rank's slice of the sequence inside the sequence-parallel region (the models' training
forwards), the LayerNorms are tagged `sequence_parallel` (their gradients are summed over
the TP group) and the stack draws its dropout masks under the model-parallel RNG fork, as
Megatron-core's TransformerBlock does; attention still sees the whole sequence.
"""
from __future__ import annotations

import contextlib
import functools
import math
from typing import Optional, Tuple

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from mega.errors import ConfigError
from mega.runtime import recompute
from mega.runtime.parallel import current
from mega.runtime.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    copy_to_tp,
    gather_from_sp,
    get_rng_tracker,
    mark_replicated,
    scatter_to_sp,
    sequence_parallel_active,
    sequence_parallel_linear,
    tag_sequence_parallel,
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
    # activation memory (mega.plugins.models.scaling: the keys and their checks)
    activations_checkpoint_granularity: Optional[str] = None  # "selective", "full" or None
    activations_checkpoint_method: Optional[str] = None  # "uniform" or "block" (full)
    activations_checkpoint_num_layers: Optional[int] = None
    recompute_modules: Tuple[str, ...] = attrs.field(default=("core_attn",), converter=tuple)
    sequence_parallel: bool = False
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

    def recomputes(self, module: str) -> bool:
        """Selective recomputation of `module` ("core_attn", "mlp") is on."""
        return self.activations_checkpoint_granularity == "selective" and module in self.recompute_modules

    @property
    def full_recompute(self) -> Tuple[Optional[str], Optional[int]]:
        """(method, number of layers) of `full` recomputation; (None, None) without it."""
        if self.activations_checkpoint_granularity != "full":
            return None, None
        return self.activations_checkpoint_method, self.activations_checkpoint_num_layers

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
        self.sequence_parallel = cfg.sequence_parallel

    def forward(self, tokens: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.dropout_out(self.word_embeddings(tokens) + self.position_embeddings(position_ids))

    def dropout_out(self, x: torch.Tensor) -> torch.Tensor:
        """The embeddings' sum through the embedding dropout; in the sequence-parallel
        region first cut to this rank's slice of the sequence, whose mask comes from the
        model-parallel stream (each rank's tokens their own, Megatron's rule)."""
        if sequence_parallel_active(self.sequence_parallel):
            with get_rng_tracker().fork():
                return self.embedding_dropout(scatter_to_sp(x))
        return self.embedding_dropout(x)


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
        self.recompute_core = cfg.recomputes("core_attn")
        self.query_key_value = ColumnParallelLinear(cfg.hidden_size, 3 * cfg.hidden_size, cfg.init_method,
                                                    sequence_parallel=cfg.sequence_parallel)
        self.dense = RowParallelLinear(cfg.hidden_size, cfg.hidden_size, cfg.output_init_method,
                                       sequence_parallel=cfg.sequence_parallel)

    def forward(self, x: torch.Tensor, cache: Optional[KVCache] = None, key_mask: Optional[torch.Tensor] = None,
                causal: bool = True) -> torch.Tensor:
        """`key_mask` [b, s] (True = attend) masks padded keys; `causal=False` for encoders.
        Under sequence parallelism `x` is this rank's slice of the sequence and the QKV
        linear gathers the whole of it."""
        qkv = self.query_key_value(x)
        b, s = qkv.shape[:2]
        qkv = qkv.view(b, s, self.num_heads, 3, self.head_dim)
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
        core = functools.partial(attend, dropout=self.attention_dropout if self.training else 0.0,
                                 is_causal=causal and mask is None, backend=self.attention_backend)
        y = recompute.checkpoint(core, q, k, v, mask) if self.recompute_core and recompute.wanted(self) \
            else core(q, k, v, mask)
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
    masks (the model-parallel RNG tracker; inside the stack's fork under sequence
    parallelism, the same stream). `backend`: ATTENTION_BACKENDS."""
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
        self.recompute_core = cfg.recomputes("core_attn")
        # under sequence parallelism x is this rank's slice; the memory is whole on every rank
        self.query = ColumnParallelLinear(cfg.hidden_size, cfg.hidden_size, cfg.init_method,
                                          sequence_parallel=cfg.sequence_parallel)
        self.key_value = ColumnParallelLinear(memory_size or cfg.hidden_size, 2 * cfg.hidden_size, cfg.init_method)
        self.dense = RowParallelLinear(cfg.hidden_size, cfg.hidden_size, cfg.output_init_method,
                                       sequence_parallel=cfg.sequence_parallel)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, memory_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        q = self.query(x)
        b, s = q.shape[:2]
        q = q.view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        kv = self.key_value(memory).view(b, memory.shape[1], self.num_heads, 2, self.head_dim)
        k, v = (t.transpose(1, 2) for t in kv.unbind(dim=3))
        mask = None if memory_mask is None else memory_mask[:, None, None, :].bool()
        core = functools.partial(attend, dropout=self.attention_dropout if self.training else 0.0,
                                 backend=self.attention_backend)
        y = recompute.checkpoint(core, q, k, v, mask) if self.recompute_core and recompute.wanted(self) \
            else core(q, k, v, mask)
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
        self.recompute = cfg.recomputes("mlp")
        self.dense_h_to_4h = ColumnParallelLinear(cfg.hidden_size, cfg.ffn, cfg.init_method,
                                                  sequence_parallel=cfg.sequence_parallel)
        self.dense_4h_to_h = RowParallelLinear(cfg.ffn, cfg.hidden_size, cfg.output_init_method,
                                               sequence_parallel=cfg.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.recompute and recompute.wanted(self):  # keeps only x, the LayerNorm's output
            return recompute.checkpoint(self._forward, x)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x), approximate=self.approximate))


def layer_norm(cfg: BlockConfig) -> nn.LayerNorm:
    """A LayerNorm of the residual stream; under sequence parallelism it sees this rank's
    tokens only, so its parameters are tagged for the TP sum of their gradients."""
    norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_epsilon)
    return tag_sequence_parallel(norm) if cfg.sequence_parallel else norm


class TransformerLayer(nn.Module):
    """x + attn(LN(x)), then x + mlp(LN(x)), with dropout on each residual branch."""

    def __init__(self, cfg: BlockConfig, layer_number: int):
        super().__init__()
        self.input_layernorm = layer_norm(cfg)
        self.self_attention = SelfAttention(cfg, layer_number)
        self.post_attention_layernorm = layer_norm(cfg)
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
        self.full_recompute = cfg.full_recompute
        self.sequence_parallel = cfg.sequence_parallel
        layers = []
        for i in range(cfg.num_layers):  # build each layer, keep this stage's (memory: one at a time)
            layer = TransformerLayer(cfg, i - keep.start)
            if i in keep:
                layers.append(layer)
        self.layers = nn.ModuleList(layers)
        self.final_layernorm = layer_norm(cfg) if final_layernorm else None

    def forward(self, x: torch.Tensor, cache: Optional[KVCache] = None, key_mask: Optional[torch.Tensor] = None,
                causal: bool = True) -> torch.Tensor:
        """Under sequence parallelism `x` is this rank's slice of the sequence, and so is
        the output; the stack draws from the model-parallel RNG stream (module docstring)."""
        fork = get_rng_tracker().fork() if sequence_parallel_active(self.sequence_parallel) else contextlib.nullcontext()
        method, k = self.full_recompute if cache is None and recompute.wanted(self) else (None, None)
        with fork:
            x = recompute.run_layers(self.layers, x, cache, key_mask, causal, method=method, num_layers=k)
            if cache is not None:
                cache.length += x.shape[1]
            return self.final_layernorm(x) if self.final_layernorm is not None else x


def output_logits(hidden: torch.Tensor, weight: torch.Tensor, sequence_parallel: bool) -> torch.Tensor:
    """The output layer, column-parallel over the vocabulary: this rank's logits slice for
    every token. Under sequence parallelism `hidden` is this rank's slice of the sequence,
    gathered by the linear (which saves only the slice)."""
    if sequence_parallel_active(sequence_parallel):
        return sequence_parallel_linear(hidden, weight)
    return F.linear(copy_to_tp(hidden), weight)


def output_layer_input(hidden: torch.Tensor, sequence_parallel: bool) -> torch.Tensor:
    """`hidden` as a column-parallel layer over the whole sequence takes it (the chunked
    loss's input): gathered from the sequence-parallel slices, or as is (copy_to_tp)."""
    if sequence_parallel_active(sequence_parallel):
        return gather_from_sp(hidden)
    return copy_to_tp(hidden)


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
