"""Pre-LayerNorm transformer blocks shared by the model plugins, on the kernel's
tensor-parallel layers.

Parameter names follow Megatron-LM's legacy layout (`self_attention.query_key_value`,
`mlp.dense_h_to_4h`, ...) so checkpoints map key for key (see specs/checkpoints.md). The
fused QKV weight is stored per head as [num_heads, 3, head_dim] rows (checkpoint_version
>= 2.0), which is also what a column-parallel split by heads needs: each rank holds whole
heads with their Q, K and V.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from mega.runtime.parallel import current
from mega.runtime.tensor_parallel import ColumnParallelLinear, RowParallelLinear, get_rng_tracker


def normal_init(std: float) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda t: nn.init.normal_(t, 0.0, std)


def scaled_init(std: float, num_layers: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Megatron's init of the output projection of each residual branch: std / sqrt(2L)."""
    return normal_init(std / math.sqrt(2.0 * num_layers))


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
    def __init__(self, hidden_size: int, num_heads: int, attention_dropout: float, layer_number: int,
                 init_method, output_init_method):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_attention_heads {num_heads}")
        tp = current().tp_size
        if num_heads % tp:
            raise ValueError(f"num_attention_heads {num_heads} is not divisible by the tensor-parallel size {tp}")
        self.num_heads = num_heads // tp  # heads on this rank
        self.head_dim = hidden_size // num_heads
        self.attention_dropout = attention_dropout
        self.layer_number = layer_number  # index into a KV cache (local to this pipeline stage)
        self.query_key_value = ColumnParallelLinear(hidden_size, 3 * hidden_size, init_method)
        self.dense = RowParallelLinear(hidden_size, hidden_size, output_init_method)

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
                   is_causal=causal and mask is None)
        return self.dense(y.transpose(1, 2).reshape(b, s, -1))


def attend(q, k, v, mask, dropout: float, is_causal: bool = False) -> torch.Tensor:
    """SDPA with a boolean mask (or SDPA's own causal mask); rows whose keys are all masked
    give zeros, not NaN. Under tensor parallelism this rank's heads draw their own dropout
    masks (the model-parallel RNG tracker)."""
    rng = get_rng_tracker().fork() if dropout and current().tp_size > 1 else contextlib.nullcontext()
    with rng:
        if mask is not None:
            empty = ~mask.any(dim=-1, keepdim=True)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask | empty, dropout_p=dropout)
            return y.masked_fill(empty, 0.0)
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=is_causal)


class CrossAttention(nn.Module):
    """Queries from x, keys and values from a memory (Megatron's `inter_attention`)."""

    def __init__(self, hidden_size: int, num_heads: int, attention_dropout: float, init_method, output_init_method,
                 memory_size: Optional[int] = None):
        super().__init__()
        tp = current().tp_size
        if hidden_size % num_heads or num_heads % tp:
            raise ValueError(f"hidden_size {hidden_size}, num_attention_heads {num_heads}, tensor-parallel size {tp} do not divide")
        self.num_heads, self.head_dim = num_heads // tp, hidden_size // num_heads
        self.attention_dropout = attention_dropout
        self.query = ColumnParallelLinear(hidden_size, hidden_size, init_method)
        self.key_value = ColumnParallelLinear(memory_size or hidden_size, 2 * hidden_size, init_method)
        self.dense = RowParallelLinear(hidden_size, hidden_size, output_init_method)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, memory_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.query(x).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        kv = self.key_value(memory).view(b, memory.shape[1], self.num_heads, 2, self.head_dim)
        k, v = (t.transpose(1, 2) for t in kv.unbind(dim=3))
        mask = None if memory_mask is None else memory_mask[:, None, None, :].bool()
        y = attend(q, k, v, mask, self.attention_dropout if self.training else 0.0)
        return self.dense(y.transpose(1, 2).reshape(b, s, -1))


class MLP(nn.Module):
    def __init__(self, hidden_size: int, ffn_hidden_size: int, init_method, output_init_method):
        super().__init__()
        self.dense_h_to_4h = ColumnParallelLinear(hidden_size, ffn_hidden_size, init_method)
        self.dense_4h_to_h = RowParallelLinear(ffn_hidden_size, hidden_size, output_init_method)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Megatron's default GeLU is the tanh approximation (openai_gelu off -> erf); we use erf.
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x)))


class TransformerLayer(nn.Module):
    """x + attn(LN(x)), then x + mlp(LN(x)), with dropout on each residual branch."""

    def __init__(self, hidden_size, num_heads, ffn_hidden_size, hidden_dropout, attention_dropout, eps, layer_number,
                 init_method, output_init_method):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(hidden_size, eps=eps)
        self.self_attention = SelfAttention(hidden_size, num_heads, attention_dropout, layer_number, init_method,
                                            output_init_method)
        self.post_attention_layernorm = nn.LayerNorm(hidden_size, eps=eps)
        self.mlp = MLP(hidden_size, ffn_hidden_size, init_method, output_init_method)
        self.hidden_dropout = nn.Dropout(hidden_dropout)

    def forward(self, x: torch.Tensor, cache: Optional[KVCache] = None, key_mask: Optional[torch.Tensor] = None,
                causal: bool = True) -> torch.Tensor:
        x = x + self.hidden_dropout(self.self_attention(self.input_layernorm(x), cache, key_mask, causal))
        return x + self.hidden_dropout(self.mlp(self.post_attention_layernorm(x)))


class TransformerStack(nn.Module):
    """The `encoder` of Megatron's language_model: layers, then a final LayerNorm on the
    last pipeline stage. `layer_offset` is the global index of the first layer here."""

    def __init__(self, num_layers, hidden_size, num_heads, ffn_hidden_size, hidden_dropout, attention_dropout, eps,
                 init_method, output_init_method, keep: Optional[range] = None, final_layernorm: bool = True):
        """`keep`: the global indices of the layers this pipeline stage holds (all by default).
        Every layer is still built in order and the others dropped, so each stage draws the
        same initial weights as the single-stage model."""
        super().__init__()
        keep = range(num_layers) if keep is None else keep
        self.layer_offset = keep.start
        layers = []
        for i in range(num_layers):
            layer = TransformerLayer(hidden_size, num_heads, ffn_hidden_size, hidden_dropout, attention_dropout, eps,
                                     i - keep.start, init_method, output_init_method)
            if i in keep:
                layers.append(layer)
        self.layers = nn.ModuleList(layers)
        self.final_layernorm = nn.LayerNorm(hidden_size, eps=eps) if final_layernorm else None

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
