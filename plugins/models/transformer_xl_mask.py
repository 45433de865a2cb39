"""Transformer-XL's causal mask over memory and segment: the one rule both the eager model
(`transformer_xl`) and its TorchScript twin (`transformer_xl_script`) apply, in a module of
its own so that neither has to import the other for it."""
from __future__ import annotations

import torch


def attn_mask(qlen: int, mlen: int, mem_len: int, same_length: bool, device: torch.device) -> torch.Tensor:
    """[qlen, klen] bool, True = masked. Query i sees the memory and keys up to itself; with
    `same_length`, only its last mem_len + 1 keys (NVIDIA's `klen - mem_len - 1`)."""
    klen = mlen + qlen
    ones = torch.ones(qlen, klen, dtype=torch.bool, device=device)
    mask = torch.triu(ones, diagonal=1 + mlen)
    if same_length:
        mask_len = klen - mem_len - 1
        shift = qlen - mask_len if mask_len > 0 else qlen
        mask = mask | torch.tril(ones, diagonal=-shift)
    return mask
