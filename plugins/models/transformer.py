"""Pre-LayerNorm transformer blocks shared by the model plugins, on the kernel's
tensor-parallel layers.

Parameter names follow Megatron-LM's legacy layout (`self_attention.query_key_value`,
`mlp.dense_h_to_4h`, ...) so Megatron-LM checkpoints map key for key. The
fused QKV weight is stored per head as [num_heads, 3, head_dim] rows (checkpoint_version
>= 2.0), which is also what a column-parallel split by heads needs: each rank holds whole
heads with their Q, K and V.

The architecture options (mega.plugins.models.architecture: rotary positions, RMSNorm,
the gated SiLU MLP, grouped-query attention, biases) are megatron-core's layouts: the
fused QKV rows are grouped per key/value head, `[groups, heads per group + 2, head_dim]`
(q heads of the group, its k head, its v head; the per-head `[heads, 3, head_dim]` above
is the case of one query head per group), the gated MLP's fc1 is `[gate; up]` split per
half under tensor parallelism, so megatron-core / Megatron-LM / NeMo files map by name.

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
from mega.plugins.models.architecture import GATED, check_architecture, default_ffn
from mega.plugins.models.rotary import RotaryEmbedding, apply_rotary
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
    # architecture options (mega.plugins.models.architecture); the defaults are GPT-2's shape
    position_embedding_type: str = "learned_absolute"
    rotary_percent: float = 1.0
    rotary_base: float = 10000.0
    rotary_interleaved: bool = False
    seq_len_interpolation_factor: Optional[float] = None
    rope_scaling: bool = False
    rope_scaling_factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    old_context_len: int = 8192
    normalization: str = "LayerNorm"
    num_query_groups: Optional[int] = None
    kv_channels: Optional[int] = None
    add_bias_linear: bool = True
    add_qkv_bias: bool = False
    window_size: Optional[Tuple[int, int]] = attrs.field(default=None, converter=lambda w: None if w is None else tuple(w))
    where: str = "model"

    @classmethod
    def of(cls, section, **overrides) -> "BlockConfig":
        """The block keys of a config section (attributes of the same names)."""
        names = [a.name for a in attrs.fields(cls) if a.name not in overrides and hasattr(section, a.name)]
        return cls(**{n: getattr(section, n) for n in names}, **overrides)

    @property
    def ffn(self) -> int:
        """The MLP's width (per branch of a gated MLP)."""
        return self.ffn_hidden_size or default_ffn(self.hidden_size, self.gated)

    @property
    def gated(self) -> bool:
        return self.activation in GATED

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def query_groups(self) -> int:
        """Key/value heads (= query heads without grouped-query attention)."""
        return self.num_query_groups or self.num_attention_heads

    @property
    def qkv_bias(self) -> bool:
        return self.add_bias_linear or self.add_qkv_bias

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
    check_architecture(cfg, w, tp)
    if cfg.num_attention_heads % tp:
        raise ConfigError(f"{w}.num_attention_heads={cfg.num_attention_heads} is not divisible by model.tensor_model_parallel_size={tp}")
    if cfg.ffn < 1:
        raise ConfigError(f"{w}.ffn_hidden_size: Megatron's default for a gated MLP, int(8 * hidden_size / 3 / 64) * 64,"
                          f" is 0 at hidden_size={cfg.hidden_size}; set it")
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
    `language_model.embedding`). With rotary or no position embeddings there is no table
    (megatron-core's LanguageModelEmbedding makes one only for "learned_absolute")."""

    def __init__(self, vocab: int, cfg: BlockConfig, max_positions: int):
        super().__init__()
        self.word_embeddings = VocabParallelEmbedding(vocab, cfg.hidden_size, cfg.init_method)
        self.position_embeddings = None
        if cfg.position_embedding_type == "learned_absolute":
            self.position_embeddings = nn.Embedding(max_positions, cfg.hidden_size)
            cfg.init_method(self.position_embeddings.weight.data)
        self.embedding_dropout = nn.Dropout(cfg.hidden_dropout)
        self.sequence_parallel = cfg.sequence_parallel

    def forward(self, tokens: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        if self.position_embeddings is None:
            return self.dropout_out(self.word_embeddings(tokens))
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
    """Pre-allocated keys and values of every layer for incremental decoding: the key/value
    heads of this rank (grouped-query attention caches `num_query_groups / TP` heads), keys
    stored after their rotary embedding, as HF's DynamicCache does."""

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
    """Self-attention with the fused QKV linear: rows grouped per key/value head (module
    docstring), each rank holding whole groups; optional rotary embeddings of q and k,
    a sliding window, and grouped-query attention (SDPA's `enable_gqa`)."""

    def __init__(self, cfg: BlockConfig, layer_number: int):
        super().__init__()
        tp = current().tp_size
        self.num_heads = cfg.num_attention_heads // tp  # query heads on this rank
        self.num_groups = cfg.query_groups // tp  # key/value heads on this rank
        self.head_dim = cfg.head_dim
        self.attention_dropout = cfg.attention_dropout
        self.attention_backend = cfg.attention_backend
        self.layer_number = layer_number  # index into a KV cache (local to this pipeline stage)
        self.recompute_core = cfg.recomputes("core_attn")
        self.rotary_interleaved = cfg.rotary_interleaved
        self.window = cfg.window_size[0] if cfg.window_size is not None else None
        rows = (cfg.num_attention_heads + 2 * cfg.query_groups) * cfg.head_dim
        self.query_key_value = ColumnParallelLinear(cfg.hidden_size, rows, cfg.init_method, bias=cfg.qkv_bias,
                                                    sequence_parallel=cfg.sequence_parallel)
        self.dense = RowParallelLinear(cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size, cfg.output_init_method,
                                       bias=cfg.add_bias_linear, sequence_parallel=cfg.sequence_parallel)

    def split_qkv(self, qkv: torch.Tensor):
        """q [b, heads, s, hd] and k, v [b, groups, s, hd] of this rank from its QKV rows."""
        b, s = qkv.shape[:2]
        if self.num_groups == self.num_heads:  # one query head per group: [heads, 3, head_dim]
            qkv = qkv.view(b, s, self.num_heads, 3, self.head_dim)
            return tuple(t.transpose(1, 2) for t in qkv.unbind(dim=3))
        per_group = self.num_heads // self.num_groups
        qkv = qkv.view(b, s, self.num_groups, per_group + 2, self.head_dim)
        q = qkv[:, :, :, :per_group].reshape(b, s, self.num_heads, self.head_dim)
        return q.transpose(1, 2), qkv[:, :, :, per_group].transpose(1, 2), qkv[:, :, :, per_group + 1].transpose(1, 2)

    def forward(self, x: torch.Tensor, cache: Optional[KVCache] = None, key_mask: Optional[torch.Tensor] = None,
                causal: bool = True, rope: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        """`key_mask` [b, s] (True = attend) masks padded keys; `causal=False` for encoders;
        `rope`: (cos, sin) of this call's positions. Under sequence parallelism `x` is this
        rank's slice of the sequence and the QKV linear gathers the whole of it."""
        qkv = self.query_key_value(x)
        b, s = qkv.shape[:2]
        q, k, v = self.split_qkv(qkv)
        if rope is not None:  # cos and sin in the activations' dtype once for q and k
            cos, sin = (t.to(q.dtype) for t in rope)
            q = apply_rotary(q, cos, sin, interleaved=self.rotary_interleaved)
            k = apply_rotary(k, cos, sin, interleaved=self.rotary_interleaved)
        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.append(self.layer_number, k, v)
        mask = None
        if causal and (past or self.window is not None):  # queries see cached positions and the causal part of their own
            mask = torch.ones(s, past + s, dtype=torch.bool, device=x.device).tril(diagonal=past)
            if self.window is not None:  # and no key more than `window` positions before them
                mask &= torch.ones_like(mask).triu(diagonal=past - self.window)
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


# SDPA's own grouped-query attention (torch >= 2.5) where the kernel has it; else K and V
# are repeated per query head (same numbers, more memory)
GQA_BACKENDS = ("auto", "flash", "math")
_HAS_GQA = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


def attend(q, k, v, mask, dropout: float, is_causal: bool = False, backend: str = "auto") -> torch.Tensor:
    """SDPA with a boolean mask (or SDPA's own causal mask); rows whose keys are all masked
    give zeros, not NaN. Under tensor parallelism this rank's heads draw their own dropout
    masks (the model-parallel RNG tracker; inside the stack's fork under sequence
    parallelism, the same stream). `backend`: ATTENTION_BACKENDS. With fewer key/value heads
    than query heads (grouped-query attention), query head i reads key/value head
    i // (heads per group)."""
    rng = get_rng_tracker().fork() if dropout and current().tp_size > 1 else contextlib.nullcontext()
    gqa = {}
    if k.shape[1] != q.shape[1]:
        if _HAS_GQA and backend in GQA_BACKENDS:
            gqa = {"enable_gqa": True}
        else:
            per_group = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(per_group, dim=1), v.repeat_interleave(per_group, dim=1)
    with rng, sdpa_backend(backend, q.device):
        if mask is not None:
            empty = ~mask.any(dim=-1, keepdim=True)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask | empty, dropout_p=dropout, **gqa)
            return y.masked_fill(empty, 0.0)
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=is_causal, **gqa)


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


# model `activation` -> F.gelu's `approximate`; "swiglu" is the gated MLP with SiLU
ACTIVATIONS = {"gelu": "none", "gelu_tanh": "tanh", "swiglu": None}


class MLP(nn.Module):
    """dense_h_to_4h, GELU, dense_4h_to_h. `activation = "gelu"` is the exact (erf) GELU,
    Megatron-LM's with `bias_gelu_fusion` and `openai_gelu` off; `"gelu_tanh"` is the tanh
    approximation that Megatron's fused bias-GELU kernel (its default) and `openai_gelu`
    compute, and GPT-2's `gelu_new`. `"swiglu"`: fc1 = [gate; up] (2 x ffn rows, each half
    split over the TP ranks), silu(gate) * up, then fc2 (Llama's MLP, megatron-core's
    `gated_linear_unit` with `F.silu`)."""

    def __init__(self, cfg: BlockConfig):
        super().__init__()
        self.approximate = ACTIVATIONS[cfg.activation]
        self.gated = cfg.gated
        self.recompute = cfg.recomputes("mlp")
        self.dense_h_to_4h = ColumnParallelLinear(cfg.hidden_size, cfg.ffn * (2 if self.gated else 1), cfg.init_method,
                                                  bias=cfg.add_bias_linear, sequence_parallel=cfg.sequence_parallel,
                                                  chunks=2 if self.gated else 1)
        self.dense_4h_to_h = RowParallelLinear(cfg.ffn, cfg.hidden_size, cfg.output_init_method, bias=cfg.add_bias_linear,
                                               sequence_parallel=cfg.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.recompute and recompute.wanted(self):  # keeps only x, the LayerNorm's output
            return recompute.checkpoint(self._forward, x)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            gate, up = self.dense_h_to_4h(x).chunk(2, dim=-1)
            return self.dense_4h_to_h(F.silu(gate) * up)
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x), approximate=self.approximate))


class RMSNorm(nn.Module):
    """Root-mean-square normalisation with a weight and no bias or centring, in Hugging
    Face's order (LlamaRMSNorm): normalised in fp32, cast back to the input's dtype, then
    multiplied by the weight. `torch.nn.RMSNorm` (megatron-core's local spec) equals it in
    fp32; in 16 bits HF's order is the one its checkpoints were trained with."""

    def __init__(self, size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def layer_norm(cfg: BlockConfig) -> nn.Module:
    """The norm of the residual stream (`normalization`: LayerNorm or RMSNorm); under
    sequence parallelism it sees this rank's tokens only, so its parameters are tagged for
    the TP sum of their gradients."""
    if cfg.normalization == "RMSNorm":
        norm = RMSNorm(cfg.hidden_size, eps=cfg.layernorm_epsilon)
    else:
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
                causal: bool = True, rope: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        x = x + self.hidden_dropout(self.self_attention(self.input_layernorm(x), cache, key_mask, causal, rope))
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
        self.rotary = RotaryEmbedding.of(cfg) if cfg.position_embedding_type == "rope" else None

    def forward(self, x: torch.Tensor, cache: Optional[KVCache] = None, key_mask: Optional[torch.Tensor] = None,
                causal: bool = True) -> torch.Tensor:
        """Under sequence parallelism `x` is this rank's slice of the sequence, and so is
        the output; the stack draws from the model-parallel RNG stream (module docstring).
        With rotary embeddings, positions continue from the cache's length (0 without one)."""
        sp = sequence_parallel_active(self.sequence_parallel)
        fork = get_rng_tracker().fork() if sp else contextlib.nullcontext()
        method, k = self.full_recompute if cache is None and recompute.wanted(self) else (None, None)
        extra = ()
        if self.rotary is not None:
            length = x.shape[1] * (current().tp_size if sp else 1)  # attention sees the whole sequence
            extra = (self.rotary(cache.length if cache is not None else 0, length, x.device),)
        with fork:
            x = recompute.run_layers(self.layers, x, cache, key_mask, causal, *extra, method=method, num_layers=k)
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
        """A model with an output layer of its own says `share_embeddings_and_output_weights
        = False` first (then no copy is made and nothing is aliased)."""
        if self.post_process and not self.pre_process and getattr(self, "share_embeddings_and_output_weights", True):
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
        """The word-embedding matrix that also produces the logits (megatron-core's name);
        on a last stage without the embedding, its copy, or an untied output layer's."""
        if self.pre_process:
            return self.language_model.embedding.word_embeddings.weight
        if not getattr(self, "share_embeddings_and_output_weights", True):
            return self.language_model.output_layer.weight
        return self.word_embeddings_for_head.weight
