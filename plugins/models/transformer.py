"""Pre-LayerNorm transformer blocks shared by the model plugins.

Parameter names follow Megatron-LM's legacy layout (`self_attention.query_key_value`,
`mlp.dense_h_to_4h`, ...) so checkpoints map key for key (see specs/checkpoints.md). The
fused QKV weight is stored per head as [num_heads, 3, head_dim] rows (checkpoint_version
>= 2.0), which is also the layout a column-parallel split by heads needs.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


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
    def __init__(self, hidden_size: int, num_heads: int, attention_dropout: float, layer_number: int):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_attention_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.attention_dropout = attention_dropout
        self.layer_number = layer_number
        self.query_key_value = nn.Linear(hidden_size, 3 * hidden_size)
        self.dense = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor, cache: Optional[KVCache] = None) -> torch.Tensor:
        b, s, _ = x.shape
        qkv = self.query_key_value(x).view(b, s, self.num_heads, 3, self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(dim=3))  # each [b, heads, s, head_dim]
        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.append(self.layer_number, k, v)
        dropout = self.attention_dropout if self.training else 0.0
        if past == 0:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        else:  # new queries see every cached position and the causal part of their own
            mask = torch.ones(s, past + s, dtype=torch.bool, device=x.device).tril(diagonal=past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        return self.dense(y.transpose(1, 2).reshape(b, s, -1))


class MLP(nn.Module):
    def __init__(self, hidden_size: int, ffn_hidden_size: int):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(hidden_size, ffn_hidden_size)
        self.dense_4h_to_h = nn.Linear(ffn_hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Megatron's default GeLU is the tanh approximation (openai_gelu off -> erf); we use erf.
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x)))


class TransformerLayer(nn.Module):
    """x + attn(LN(x)), then x + mlp(LN(x)), with dropout on each residual branch."""

    def __init__(self, hidden_size, num_heads, ffn_hidden_size, hidden_dropout, attention_dropout, eps, layer_number):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(hidden_size, eps=eps)
        self.self_attention = SelfAttention(hidden_size, num_heads, attention_dropout, layer_number)
        self.post_attention_layernorm = nn.LayerNorm(hidden_size, eps=eps)
        self.mlp = MLP(hidden_size, ffn_hidden_size)
        self.hidden_dropout = nn.Dropout(hidden_dropout)

    def forward(self, x: torch.Tensor, cache: Optional[KVCache] = None) -> torch.Tensor:
        x = x + self.hidden_dropout(self.self_attention(self.input_layernorm(x), cache))
        return x + self.hidden_dropout(self.mlp(self.post_attention_layernorm(x)))


class TransformerStack(nn.Module):
    """The `encoder` of Megatron's language_model: layers then a final LayerNorm."""

    def __init__(self, num_layers, hidden_size, num_heads, ffn_hidden_size, hidden_dropout, attention_dropout, eps):
        super().__init__()
        self.layers = nn.ModuleList(
            TransformerLayer(hidden_size, num_heads, ffn_hidden_size, hidden_dropout, attention_dropout, eps, i)
            for i in range(num_layers)
        )
        self.final_layernorm = nn.LayerNorm(hidden_size, eps=eps)

    def forward(self, x: torch.Tensor, cache: Optional[KVCache] = None) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, cache)
        if cache is not None:
            cache.length += x.shape[1]
        return self.final_layernorm(x)


def init_megatron_(module: nn.Module, std: float, num_layers: int) -> None:
    """Megatron's initialisation: N(0, std) weights, output projections of each residual
    branch scaled by 1/sqrt(2 * num_layers), zero biases, unit LayerNorms."""
    out_std = std / math.sqrt(2.0 * num_layers)
    for name, p in module.named_parameters():
        if p.dim() == 1:
            if "layernorm" in name and name.endswith("weight"):
                nn.init.ones_(p)
            else:
                nn.init.zeros_(p)
        elif name.endswith("self_attention.dense.weight") or name.endswith("dense_4h_to_h.weight"):
            nn.init.normal_(p, 0.0, out_std)
        else:
            nn.init.normal_(p, 0.0, std)


def padded_vocab_size(vocab_size: int, divisible_by: int, tensor_parallel: int = 1) -> int:
    """Pad the vocabulary to a multiple of divisible_by x TP, as Megatron does."""
    multiple = divisible_by * tensor_parallel
    return ((vocab_size + multiple - 1) // multiple) * multiple

