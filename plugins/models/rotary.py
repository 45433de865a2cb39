"""Rotary position embeddings (RoPE) for the transformer blocks: the frequencies, their
Llama 3.1 and linear scalings, and the rotation of queries and keys, in both pairings of
the rotated dimensions.

The numbers are Hugging Face transformers' (`LlamaRotaryEmbedding`, `rotate_half`,
`_compute_llama3_parameters`), which megatron-core's `RotaryEmbedding` computes too:

* `d = int(head_dim * rotary_percent)` dimensions of each head rotate, the rest pass;
* `inv_freq[i] = 1 / base ** (2i / d)` in fp32; a linear `seq_len_interpolation_factor`
  divides them (HF scales the frequencies where megatron-core scales the positions: equal
  up to fp32 rounding, and HF's order is the one its checkpoints were trained with);
  `rope_scaling` applies Llama 3.1's banded scaling (below);
* angles `position * inv_freq`, their cos and sin in fp32, cast to the activations' dtype
  where they are applied; `x' = x * cos + rotate(x) * sin`.

Pairings: the "half" layout (HF's `rotate_half`, GPT-NeoX, megatron-core's
`rotary_interleaved = false`, mega's default) rotates dims `(i, i + d/2)` together; the
interleaved layout (GPT-J, Meta's original checkpoints, `rotary_interleaved = true`)
rotates `(2i, 2i + 1)`. Both give the same attention scores on rows permuted per head.

Nothing here has parameters or persistent buffers: checkpoints hold no RoPE tensor.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch


def rotary_dim(head_dim: int, rotary_percent: float) -> int:
    """How many dims of each head rotate (megatron-core's and HF's `int(head_dim * percent)`)."""
    return int(head_dim * rotary_percent)


def llama3_scaled(inv_freq: torch.Tensor, factor: float, low_freq_factor: float, high_freq_factor: float,
                  old_context_len: int) -> torch.Tensor:
    """Llama 3.1's frequency scaling: wavelengths shorter than `old_context_len /
    high_freq_factor` are kept, those longer than `old_context_len / low_freq_factor` are
    divided by `factor`, and the band between is blended linearly in `old_context_len /
    wavelength` (the arithmetic in HF's order, so the fp32 values are HF's)."""
    low_wavelen = old_context_len / low_freq_factor
    high_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def inverse_frequencies(dim: int, base: float, interpolation: Optional[float] = None, llama3: Optional[dict] = None
                        ) -> torch.Tensor:
    """`inv_freq` [dim / 2] in fp32: `1 / base ** (2i / dim)`, divided by `interpolation`
    (linear scaling), or with Llama 3.1's scaling (`llama3`: factor, low_freq_factor,
    high_freq_factor, old_context_len)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if interpolation is not None:
        inv_freq = inv_freq / interpolation
    if llama3 is not None:
        inv_freq = llama3_scaled(inv_freq, **llama3)
    return inv_freq


class RotaryEmbedding:
    """cos and sin of the rotation angles of a run of positions, for one stack (computed
    once per forward, shared by its layers). Plain tensors, not a module: casting the
    model to 16 bits (megatron_amp_O2) must not round the frequencies."""

    def __init__(self, head_dim: int, rotary_percent: float = 1.0, base: float = 10000.0, interleaved: bool = False,
                 interpolation: Optional[float] = None, llama3: Optional[dict] = None):
        self.dim = rotary_dim(head_dim, rotary_percent)
        self.interleaved = interleaved
        self.inv_freq = inverse_frequencies(self.dim, base, interpolation, llama3)

    @classmethod
    def of(cls, cfg) -> "RotaryEmbedding":
        """From a block config's RoPE keys (mega.plugins.models.architecture)."""
        llama3 = None
        if cfg.rope_scaling:
            llama3 = {"factor": cfg.rope_scaling_factor, "low_freq_factor": cfg.low_freq_factor,
                      "high_freq_factor": cfg.high_freq_factor, "old_context_len": cfg.old_context_len}
        return cls(cfg.head_dim, cfg.rotary_percent, cfg.rotary_base, cfg.rotary_interleaved,
                   cfg.seq_len_interpolation_factor, llama3)

    def __call__(self, start: int, length: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin), each [length, dim] fp32, of positions start ... start + length - 1."""
        positions = torch.arange(start, start + length, device=device, dtype=torch.float32)
        angles = torch.outer(positions, self.inv_freq.to(device))
        if self.interleaved:
            emb = torch.stack([angles, angles], dim=-1).flatten(-2)  # each angle on a pair (2i, 2i + 1)
        else:
            emb = torch.cat([angles, angles], dim=-1)  # angle i on dims i and i + d/2
        return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def _rotate_interleaved(x: torch.Tensor) -> torch.Tensor:
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack([-odd, even], dim=-1).flatten(-2)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """`x` [batch, heads, seq, head_dim] rotated by angles whose cos and sin are [seq, d]:
    the first d dims of each head rotate (in the activations' dtype), the rest pass."""
    d = cos.shape[-1]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    rotate = _rotate_interleaved if interleaved else _rotate_half
    if d == x.shape[-1]:
        return x * cos + rotate(x) * sin
    head, rest = x[..., :d], x[..., d:]
    return torch.cat([head * cos + rotate(head) * sin, rest], dim=-1)
