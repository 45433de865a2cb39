"""Transformer-XL for TorchScript: a self-contained inference module (`torch.jit.load` needs
no mega) — tokens and memory in, log-probabilities (or per-token NLLs) and the new memory
out — with the evaluation settings (mem_len, clamp_len, same_length) fixed at export.

The decoder layers are the eager model's own modules (their code is scriptable); the
adaptive input and softmax are rebuilt as flat per-bucket tensors, because tied weights are
shared Python references in the eager model, which TorchScript cannot express (NVIDIA's
`mem_transformer_jit.py` copies the tied tensors by hand for the same reason).
"""
from __future__ import annotations

import copy
from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from mega.plugins.models.transformer_xl_mask import attn_mask


class _Bucket(nn.Module):
    """One adaptive bucket: ids [lo, hi), its table, projection (empty: none) and bias."""

    def __init__(self, lo: int, hi: int, weight: torch.Tensor, proj, bias=None):
        super().__init__()
        self.lo, self.hi = lo, hi
        self.has_proj = proj is not None
        self.register_buffer("weight", weight.detach().clone())
        self.register_buffer("proj", proj.detach().clone() if proj is not None else torch.zeros(0))
        self.register_buffer("bias", bias.detach().clone() if bias is not None else torch.zeros(0))

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        out = F.embedding(ids, self.weight)
        if self.has_proj:
            out = F.linear(out, self.proj)
        return out

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.has_proj:
            hidden = F.linear(hidden, self.proj.t())
        return F.linear(hidden, self.weight, self.bias)


class TXLInference(nn.Module):
    def __init__(self, model, mem_len: int, clamp_len: int, same_length: bool):
        super().__init__()
        model = copy.deepcopy(model).float().eval()
        emb, crit = model.word_emb, model.crit
        self.n_layer, self.d_model, self.n_token = model.n_layer, model.d_model, model.vocab_size
        self.mem_len, self.clamp_len, self.same_length = mem_len, clamp_len, same_length
        self.emb_scale = float(emb.emb_scale)
        self.emb_buckets = nn.ModuleList(
            [_Bucket(0, emb.n_token, emb.emb_layers[0].weight, emb.proj(0))] if emb.div_val == 1 else
            [_Bucket(lo, hi, emb.emb_layers[i].weight, emb.proj(i)) for i, (lo, hi) in enumerate(emb.bounds)])
        out = []
        for i, (lo, hi) in enumerate(crit.bounds):
            weight, bias, proj = crit.head() if i == 0 else crit.bucket(i)
            out.append(_Bucket(lo, hi, weight, proj, bias))
        self.out_buckets = nn.ModuleList(out)
        self.shortlist, self.n_clusters = crit.shortlist, crit.n_clusters
        self.layers = model.layers
        self.register_buffer("inv_freq", model.pos_emb.inv_freq.clone())
        self.r_w_bias = nn.Parameter(model.r_w_bias.detach().clone(), requires_grad=False)
        self.r_r_bias = nn.Parameter(model.r_r_bias.detach().clone(), requires_grad=False)

    @torch.jit.export
    def init_mems(self, bsz: int) -> torch.Tensor:
        """An empty memory for `bsz` streams: [n_layer, 0, bsz, d_model]."""
        return torch.zeros(self.n_layer, 0, bsz, self.d_model, device=self.r_w_bias.device)

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        flat = tokens.reshape(-1)
        out = torch.zeros(flat.numel(), self.d_model, device=tokens.device)
        for bucket in self.emb_buckets:
            idx = ((flat >= bucket.lo) & (flat < bucket.hi)).nonzero().squeeze(1)
            if idx.numel() > 0:
                out = out.index_copy(0, idx, bucket.embed(flat.index_select(0, idx) - bucket.lo))
        return out.view(tokens.size(0), tokens.size(1), self.d_model) * self.emb_scale

    @torch.jit.export
    def hidden(self, tokens: torch.Tensor, mems: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Time-major tokens [qlen, bsz] after `mems` -> (hidden [qlen, bsz, d], new memory)."""
        qlen = tokens.size(0)
        x = self._embed(tokens)
        mlen = mems.size(1)
        klen = mlen + qlen
        mask = attn_mask(qlen, mlen, self.mem_len, self.same_length, tokens.device)
        pos_seq = torch.arange(klen - 1, -1, -1.0, device=tokens.device)
        if self.clamp_len > 0:
            pos_seq = pos_seq.clamp(max=float(self.clamp_len))
        sinusoid = torch.outer(pos_seq, self.inv_freq)
        r = torch.cat([sinusoid.sin(), sinusoid.cos()], -1)[:, None, :]
        hids: List[torch.Tensor] = []
        i = 0
        for layer in self.layers:
            hids.append(x)
            x = layer(x, r, self.r_w_bias, self.r_r_bias, mask, mems[i])
            i += 1
        stacked = torch.stack(hids)
        end = mlen + qlen
        beg = max(0, end - self.mem_len)
        return x, torch.cat([mems, stacked], 1)[:, beg:end]

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        head = self.out_buckets[0]
        return F.log_softmax(head.logits(hidden).float(), -1)

    def forward(self, tokens: torch.Tensor, mems: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(log-probabilities [qlen, bsz, n_token], new memory) for time-major `tokens`."""
        h, new_mems = self.hidden(tokens, mems)
        flat = h.reshape(-1, self.d_model)
        head = self._head(flat)
        parts = [head[:, : self.shortlist]]
        i = 0
        for bucket in self.out_buckets:
            if i > 0:
                parts.append(head[:, -i].unsqueeze(1) + F.log_softmax(bucket.logits(flat).float(), -1))
            i += 1
        return torch.cat(parts, 1).view(tokens.size(0), tokens.size(1), self.n_token), new_mems

    @torch.jit.export
    def nll(self, tokens: torch.Tensor, targets: torch.Tensor, mems: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(negative log-likelihoods [qlen, bsz] of `targets`, new memory): only the buckets
        the targets fall in are computed."""
        h, new_mems = self.hidden(tokens, mems)
        flat, target = h.reshape(-1, self.d_model), targets.reshape(-1)
        head = self._head(flat)
        out = torch.zeros(target.numel(), device=flat.device)
        i = 0
        for bucket in self.out_buckets:
            idx = ((target >= bucket.lo) & (target < bucket.hi)).nonzero().squeeze(1)
            if idx.numel() > 0:
                t = (target.index_select(0, idx) - bucket.lo).unsqueeze(1)
                head_i = head.index_select(0, idx)
                if i == 0:
                    logp = head_i.gather(1, t).squeeze(1)
                else:
                    tail = F.log_softmax(bucket.logits(flat.index_select(0, idx)).float(), -1)
                    logp = head_i[:, -i] + tail.gather(1, t).squeeze(1)
                out = out.index_copy(0, idx, -logp)
            i += 1
        return out.view_as(targets), new_mems


def script_transformer_xl(model, mem_len: int, clamp_len: int, same_length: bool):
    """The scripted inference module of `model` (a TransformerXLModel, fp32) with these evaluation
    settings."""
    return torch.jit.script(TXLInference(model, mem_len, clamp_len, same_length))
