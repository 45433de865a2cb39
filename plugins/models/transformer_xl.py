"""Transformer-XL (Dai et al. 2019) as NVIDIA's PyTorch implementation trains it: relative
positional attention with biases shared by all layers, segment-level memory, adaptive
input and adaptive softmax.

Activations are time-major ([len, batch, d_model]) like the reference, so its formulas and
state-dict keys (`layers.{l}.dec_attn.qkv_net.weight`, `r_w_bias`, `word_emb.*`, `crit.*`)
carry over unchanged; mega's batch-major samples are transposed on the way in.

The memory (each layer's input over the last `mem_len` positions) is carried from one
global batch to the next, separately for every data stream (the `lm_ordered` data source
puts each sample's stream id in it), so each stream continues its own text: one device
buffer gathered and scattered by stream id (`transformer_xl_memory.StreamMemory`).
It is never back-propagated through, and it is checkpointed through
`mega.protocols.StatefulModel`, per data-parallel replica, so a resumed run continues bit
for bit. Validation inside `mega run` starts from an empty memory each time and leaves
the training memory alone; `evaluate` runs the reference's evaluation protocol.
"""
from __future__ import annotations

from pathlib import Path

import functools
import math
from typing import Dict, List, Optional, Tuple

import attrs
import torch
from attrs import define
from torch import nn

import mega
from mega.config import key, ModelConfig
from mega.config.schema import InvalidValue
from mega.errors import ConfigError
from mega.plugins.data.lm_ordered import OrderedLMObjective
from mega.plugins.models.adaptive_softmax import AdaptiveEmbedding, ProjectedAdaptiveLogSoftmax, either
from mega.plugins.models.scaling import RecomputeKeys, SequenceParallelKey, check_recompute, check_sequence_parallel
from mega.runtime import recompute
from mega.runtime.tensor_parallel import mark_replicated
from mega.plugins.models.transformer_xl_mask import attn_mask
from mega.plugins.models.transformer_xl_memory import StreamMemory


@define(kw_only=True)
class TransformerXLConfig(RecomputeKeys, SequenceParallelKey, ModelConfig):
    """`model.*` keys of the `transformer_xl` model (the reference's names; defaults are its
    WikiText-103 base model). `seq_length` is the segment length, `tgt_len` its alias."""

    n_layer: int = key(16, help="layers")
    d_model: int = key(512, help="model width")
    n_head: int = key(8, help="attention heads")
    d_head: int = key(64, help="width of each head (n_head x d_head need not equal d_model)")
    d_inner: int = key(2048, help="feed-forward width")
    d_embed: Optional[int] = key(None, help="embedding width of the first adaptive bucket; None: d_model")
    dropout: float = key(0.1, help="on embeddings, positions, attention and FF outputs, the final hidden state")
    dropatt: float = key(0.0, help="on attention probabilities")
    pre_lnorm: bool = key(False,
            help="LayerNorm before each sub-block (no final LayerNorm); false: after (the reference's)")
    tgt_len: Optional[int] = key(None, help="tokens per segment, the reference's name; sets seq_length when given")
    mem_len: int = key(192, help="memory positions carried per layer (0: none)")
    ext_len: int = key(0, help="extended context (must be 0: no shipped config uses it)")
    same_length: bool = key(False,
            help="every query sees the same number of keys (mem_len + 1 once the memory is full)")
    clamp_len: int = key(-1, help="relative distances above it use its embedding; <= 0: no clamping")
    adaptive: bool = key(True, help="adaptive input and softmax over `cutoffs`; false: one dense softmax")
    cutoffs: List[int] = key(factory=lambda: [19997, 39997, 199997], help="bucket boundaries (token ids, ascending)")
    div_val: int = key(1, help="bucket i's embedding width is d_embed // div_val**i")
    adaptive_static_shapes: Optional[bool] = key(None,
            help="adaptive buckets on every row, kept by torch.where (fixed shapes, no host sync: what CUDA graphs"
                 " capture) instead of the rows nonzero finds; None: under trainer.compile only (eager: 1.6-4x"
                 " slower at WikiText-103 shapes)")
    tie_weight: bool = key(True, help="output bucket weights are the embedding tables (biases never tied)")
    tie_projs: Optional[List[bool]] = key(None,
            help="per bucket: share the input projection (tie_weight or not); None: [false, true, true, ...]")
    init: str = key("normal", help='"normal" (N(0, init_std)) or "uniform" (U(-init_range, init_range)) for weights')
    init_range: float = key(0.1, help="uniform init bound")
    init_std: float = key(0.02, help="normal init std (also LayerNorm weights: N(1, init_std))")
    proj_init_std: float = key(0.01, help="std of the adaptive projections")
    emb_init: Optional[str] = key(None,
            help='embedding tables: None: as `init` (the reference, which never reads its --emb_init); "normal" (init_std) or "uniform" (emb_init_range)')
    emb_init_range: float = key(0.01, help='uniform bound of the embedding tables under emb_init = "uniform"')
    # the evaluation protocol (`mega evaluate`); None: the training value (eval_mem_len: 0 when
    # mem_len is 0, else mem_len + tgt_len - eval_tgt_len, keeping the attention span, as the reference does)
    eval_tgt_len: Optional[int] = key(None, help="segment length when evaluating")
    eval_mem_len: Optional[int] = key(None, help="memory length when evaluating")
    eval_clamp_len: Optional[int] = key(None,
            help="clamp_len when evaluating (the reference's test: 400 base, 1000 large)")
    eval_same_length: Optional[bool] = key(None, help="same_length when evaluating (the reference's test: true)")
    eval_batch_size: int = key(16, help="streams the evaluated split is cut into")

    def __attrs_post_init__(self):
        if self.tgt_len is not None:
            default = attrs.fields(ModelConfig).seq_length.default
            if self.seq_length not in (default, self.tgt_len):
                raise InvalidValue("tgt_len", f"{self.tgt_len} and seq_length={self.seq_length} are the same setting;"
                                              " give one")
            self.seq_length = self.tgt_len
        self.tgt_len = self.seq_length

    def check(self, plugins=None) -> None:
        check_config(self)


    @classmethod
    def tiny_preset(cls, directory) -> dict:
        """2 layers of width 32, adaptive softmax with two cutoffs, memory of 16, on a byte
        tokenizer and an ordered corpus of random words."""
        from mega.testing import write_corpus

        return {"model": {"micro_batch_size": 2, "global_batch_size": 4, "tgt_len": 16, "mem_len": 16, "n_layer": 2,
                          "d_model": 32, "n_head": 2, "d_head": 16, "d_inner": 64, "cutoffs": [64, 128], "div_val": 2,
                          "tokenizer": {"library": "bytes"},
                          "data": {"data_impl": "lm_ordered", "splits_string": "80,10,10",
                                   "data_prefix": [str(write_corpus(Path(directory) / "corpus.txt"))]},
                          "optim": {"lr": 3e-3, "weight_decay": 0.0, "sched": {"name": "constant"}}}}
    def objective(self) -> OrderedLMObjective:
        return OrderedLMObjective(streams=self.global_batch_size)

    def memory_per_rank(self, vocab_size: int, micro_batch: int, tp: int, pp: int, precision: str,
                        device: str) -> Dict[str, object]:
        """mega.protocols.EstimatesMemory: parameters counted exactly (the model built on the
        meta device: nothing is allocated), FLOPs as `flops_per_token`, activations from the
        tensors each layer keeps for backward over segment + memory (an estimate written
        from the code, not calibrated against measured peaks)."""
        with torch.device("meta"):
            model = TransformerXLModel(self, vocab_size)
        params = sum(p.numel() for p in model.parameters())
        b, q, k = micro_batch, self.seq_length, self.seq_length + self.mem_len
        d, hd, f, n = self.d_model, self.n_head * self.d_head, self.d_inner, self.n_head
        e = 4 if str(precision) == "32" else 2
        mask = 0 if not self.dropout else (1 if device == "cuda" else e)
        per_layer = (b * k * (d + 3 * hd) * e  # memory + segment into qkv_net, its output
                     + b * q * (6 * 4 * d + 4 * hd * e + f * (2 * e + mask) + 3 * mask * d)  # LNs, q+u, q+v, FF, dropout masks
                     + 5 * 4 * b * n * q * k)  # content and position scores, their sum, probabilities (fp32)
        head = model.crit.head()[0].shape[0]
        layers, rebuilt = self.n_layer * per_layer, 0
        if self.activations_checkpoint_granularity == "full":  # a chunk keeps its input (the residual stream)
            k = min(self.activations_checkpoint_num_layers or 1, self.n_layer)
            r = 2 if self.megatron_amp_O2 and e == 2 else 4
            if self.activations_checkpoint_method == "uniform":
                layers, rebuilt = math.ceil(self.n_layer / k) * b * q * d * r, k * per_layer
            else:
                layers, rebuilt = k * b * q * d * r + (self.n_layer - k) * per_layer, per_layer
        stage = {"params": params, "activations": layers + 4 * b * q * d * 3,
                 "transient": 2 * 4 * b * q * head, "grad_transient": 4 * params, "recompute_transient": rebuilt}
        return {"params": params, "flops_per_token": model.flops_per_token(self.seq_length), "stages": [stage]}

    def eval_settings(self) -> Dict[str, object]:
        """tgt_len, mem_len, clamp_len, same_length of the evaluation protocol. The memory,
        unless given, is the reference's: none for a model trained without one (mem_len 0),
        else mem_len + tgt_len - eval_tgt_len (the same attention span as in training;
        `check_config` refuses an eval_tgt_len that leaves it negative, as the reference does)."""
        tgt = self.eval_tgt_len or self.seq_length
        if self.eval_mem_len is not None:
            mem = self.eval_mem_len
        elif self.mem_len == 0:
            mem = 0
        else:
            mem = max(0, self.mem_len + self.seq_length - tgt)
        clamp = self.eval_clamp_len if self.eval_clamp_len is not None else self.clamp_len
        same = self.eval_same_length if self.eval_same_length is not None else self.same_length
        return {"tgt_len": tgt, "mem_len": mem, "clamp_len": clamp, "same_length": same}

    def resolved_tie_projs(self) -> List[bool]:
        cutoffs = self.cutoffs if self.adaptive else []
        return list(self.tie_projs) if self.tie_projs is not None else [False] + [True] * len(cutoffs)


def check_config(cfg: TransformerXLConfig, vocab_size: Optional[int] = None) -> None:
    for name in ("n_layer", "d_model", "n_head", "d_head", "d_inner", "div_val", "eval_batch_size"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"model.{name}: must be at least 1, got {getattr(cfg, name)}")
    for name in ("dropout", "dropatt"):
        if not 0.0 <= getattr(cfg, name) < 1.0:
            raise ConfigError(f"model.{name}: must be in [0, 1), got {getattr(cfg, name)}")
    if cfg.mem_len < 0:
        raise ConfigError(f"model.mem_len: must be >= 0, got {cfg.mem_len}")
    if cfg.ext_len != 0:
        raise ConfigError(f"model.ext_len={cfg.ext_len}: only 0 is supported (no reference config uses extended context)")
    for name in ("init", "emb_init"):
        if getattr(cfg, name) not in ("normal", "uniform") and not (name == "emb_init" and cfg.emb_init is None):
            raise ConfigError(f"model.{name}: \"normal\" or \"uniform\", got {getattr(cfg, name)!r}")
    # activation memory: whole layers recomputed (full); no sequence split of the segment + memory
    check_recompute(cfg, "model", cfg.n_layer, full_only=True)
    check_sequence_parallel(cfg, {}, supported="transformer_xl attends over its segment memory with relative positions;"
                                               " it is not split along the sequence")
    if cfg.tensor_model_parallel_size > 1 or cfg.pipeline_model_parallel_size > 1:
        raise ConfigError("model.tensor_model_parallel_size / model.pipeline_model_parallel_size: transformer_xl"
                          " trains with data parallelism only; set both to 1")
    if cfg.global_batch_size is None:
        raise ConfigError("model.global_batch_size: transformer_xl needs it set (the number of text streams each"
                          " step reads, the reference's batch_size)")
    cutoffs = cfg.cutoffs if cfg.adaptive else []
    if any(b <= a for a, b in zip([0] + cutoffs, cutoffs)):
        raise ConfigError(f"model.cutoffs={cfg.cutoffs}: must be positive and strictly ascending")
    if vocab_size is not None and cutoffs and cutoffs[-1] >= vocab_size:
        raise ConfigError(f"model.cutoffs={cfg.cutoffs}: the last cutoff must be below the vocabulary size {vocab_size}")
    if len(cfg.resolved_tie_projs()) != len(cutoffs) + 1:
        raise ConfigError(f"model.tie_projs={cfg.tie_projs}: needs one entry per bucket ({len(cutoffs) + 1})")
    d_embed = cfg.d_embed or cfg.d_model
    if cfg.div_val > 1 and d_embed // cfg.div_val ** len(cutoffs) < 1:
        raise ConfigError(f"model.div_val={cfg.div_val}: the last bucket's width d_embed // div_val**{len(cutoffs)} is 0")
    ev = cfg.eval_settings()
    if cfg.eval_mem_len is None and ev["tgt_len"] > cfg.seq_length + cfg.mem_len:
        raise ConfigError(f"model.eval_tgt_len={ev['tgt_len']}: must be at most tgt_len + mem_len ="
                          f" {cfg.seq_length} + {cfg.mem_len} (the evaluation memory is mem_len + tgt_len -"
                          " eval_tgt_len); shorten it or set model.eval_mem_len")
    if ev["tgt_len"] < 1 or ev["mem_len"] < 0:
        raise ConfigError(f"model.eval_tgt_len / eval_mem_len: got {ev['tgt_len']} / {ev['mem_len']}")


# --- the reference's building blocks ------------------------------------------------------------


def rel_shift(x: torch.Tensor) -> torch.Tensor:
    """[b, n, q, k] scores against positions ordered by descending distance -> scores where
    (query i, key j) holds distance mlen + i - j, for every key the causal mask keeps (the
    masked upper triangle holds leftovers). Pad a zero column left, read the buffer as
    [k + 1, q], drop its first row, read it back."""
    b, n, q, k = x.shape
    padded = torch.cat([x.new_zeros(b, n, q, 1), x], dim=3).view(b, n, k + 1, q)
    return padded[:, :, 1:].reshape(b, n, q, k)


class PositionalEmbedding(nn.Module):
    """Sinusoids of the relative distances: all sines, then all cosines (not interleaved)."""

    def __init__(self, d_model: int):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0.0, d_model, 2.0) / d_model)))

    def forward(self, pos_seq: torch.Tensor) -> torch.Tensor:
        sinusoid = torch.outer(pos_seq, self.inv_freq)
        return torch.cat([sinusoid.sin(), sinusoid.cos()], dim=-1)[:, None, :]


class PositionwiseFF(nn.Module):
    def __init__(self, d_model: int, d_inner: int, dropout: float, pre_lnorm: bool):
        super().__init__()
        self.pre_lnorm = pre_lnorm
        self.CoreNet = nn.Sequential(nn.Linear(d_model, d_inner), nn.ReLU(inplace=True), nn.Dropout(dropout),
                                     nn.Linear(d_inner, d_model), nn.Dropout(dropout))
        self.layer_norm = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_lnorm:
            return x + self.CoreNet(self.layer_norm(x))
        return self.layer_norm(x + self.CoreNet(x))


class RelPartialLearnableMultiHeadAttn(nn.Module):
    """Attention with the paper's terms (a)+(c) as AC (content, bias u = r_w_bias) and
    (b)+(d) as BD (position, bias v = r_r_bias), over memory + segment."""

    def __init__(self, n_head: int, d_model: int, d_head: int, dropout: float, dropatt: float, pre_lnorm: bool):
        super().__init__()
        self.n_head, self.d_head, self.pre_lnorm = n_head, d_head, pre_lnorm
        self.scale = 1.0 / math.sqrt(d_head)
        self.qkv_net = nn.Linear(d_model, 3 * n_head * d_head, bias=False)
        self.r_net = nn.Linear(d_model, n_head * d_head, bias=False)
        self.o_net = nn.Linear(n_head * d_head, d_model, bias=False)
        self.drop = nn.Dropout(dropout)
        self.dropatt = nn.Dropout(dropatt)
        self.layer_norm = nn.LayerNorm(d_model)

    def forward(self, w: torch.Tensor, r: torch.Tensor, r_w_bias: torch.Tensor, r_r_bias: torch.Tensor,
                mask: torch.Tensor, mems: torch.Tensor) -> torch.Tensor:
        qlen, bsz = w.size(0), w.size(1)
        cat = torch.cat([mems.to(w.dtype), w], 0)
        w_heads = self.qkv_net(self.layer_norm(cat) if self.pre_lnorm else cat)
        r_head_k = self.r_net(r).view(r.size(0), self.n_head, self.d_head)
        q, k, v = torch.chunk(w_heads, 3, dim=-1)
        klen = k.size(0)
        q = q[-qlen:].view(qlen, bsz, self.n_head, self.d_head)
        k = k.view(klen, bsz, self.n_head, self.d_head)
        v = v.view(klen, bsz, self.n_head, self.d_head)
        ac = torch.einsum("ibnd,jbnd->bnij", q + r_w_bias, k)
        bd = rel_shift(torch.einsum("ibnd,jnd->bnij", q + r_r_bias, r_head_k))
        score = (ac + bd) * self.scale
        mask = mask[None, None] if mask.dim() == 2 else mask[:, None]  # [qlen, klen] or per row [bsz, qlen, klen]
        score = score.to(torch.promote_types(score.dtype, torch.float32)).masked_fill(mask, float("-inf"))
        prob = self.dropatt(torch.softmax(score, dim=3).to(v.dtype))
        vec = torch.einsum("bnij,jbnd->ibnd", prob, v).reshape(qlen, bsz, self.n_head * self.d_head)
        out = self.drop(self.o_net(vec))
        return w + out if self.pre_lnorm else self.layer_norm(w + out)


class RelPartialLearnableDecoderLayer(nn.Module):
    def __init__(self, n_head: int, d_model: int, d_head: int, d_inner: int, dropout: float, dropatt: float,
                 pre_lnorm: bool):
        super().__init__()
        self.dec_attn = RelPartialLearnableMultiHeadAttn(n_head, d_model, d_head, dropout, dropatt, pre_lnorm)
        self.pos_ff = PositionwiseFF(d_model, d_inner, dropout, pre_lnorm)

    def forward(self, x: torch.Tensor, r: torch.Tensor, r_w_bias: torch.Tensor, r_r_bias: torch.Tensor,
                mask: torch.Tensor, mems: torch.Tensor) -> torch.Tensor:
        return self.pos_ff(self.dec_attn(x, r, r_w_bias, r_r_bias, mask, mems))


def update_mems(hids: List[torch.Tensor], mems: torch.Tensor, mem_len: int, ext_len: int = 0) -> torch.Tensor:
    """The last mem_len positions of (old memory + this segment's layer inputs), leaving out
    the last ext_len: [n_layer, <= mem_len, bsz, d], detached."""
    with torch.no_grad():
        stacked = torch.stack(hids)
        mlen, qlen = mems.size(1), stacked.size(1)
        end = mlen + max(0, qlen - ext_len)
        beg = max(0, end - mem_len)
        return torch.cat([mems.to(stacked.dtype), stacked], 1)[:, beg:end].detach()


class TXLCache:
    """The memory `mega generate` decodes with: everything seen so far (up to `max_len`
    positions), so decoding one token at a time equals running the whole text at once."""

    def __init__(self, max_len: int):
        self.mems: Optional[torch.Tensor] = None
        self.max_len = max_len


# --- the model ------------------------------------------------------------------------------------


class TransformerXLModel(nn.Module):
    """NVIDIA's `MemTransformerLM` (attn_type 0) as a mega model: a LanguageModel that is
    also a StatefulModel, a Generator and evaluates itself with the reference's protocol."""

    def __init__(self, cfg: TransformerXLConfig, vocab_size: int):
        super().__init__()
        check_config(cfg, vocab_size)
        self.config = cfg
        self.vocab_size = vocab_size
        self.max_positions = 1 << 30  # relative positions: no limit but memory
        self.n_layer, self.d_model = cfg.n_layer, cfg.d_model
        d_embed = cfg.d_embed or cfg.d_model
        cutoffs = list(cfg.cutoffs) if cfg.adaptive else []
        self.word_emb = AdaptiveEmbedding(vocab_size, d_embed, cfg.d_model, cutoffs, cfg.div_val)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(
            RelPartialLearnableDecoderLayer(cfg.n_head, cfg.d_model, cfg.d_head, cfg.d_inner, cfg.dropout, cfg.dropatt,
                                            cfg.pre_lnorm) for _ in range(cfg.n_layer))
        self.pos_emb = PositionalEmbedding(cfg.d_model)
        self.r_w_bias = nn.Parameter(torch.zeros(cfg.n_head, cfg.d_head))
        self.r_r_bias = nn.Parameter(torch.zeros(cfg.n_head, cfg.d_head))
        self.crit = ProjectedAdaptiveLogSoftmax(vocab_size, d_embed, cfg.d_model, cutoffs, cfg.div_val,
                                                cfg.resolved_tie_projs(), self.word_emb, cfg.tie_weight)
        self.word_emb.static_shapes = self.crit.static_shapes = cfg.adaptive_static_shapes
        init_weights(self, cfg)
        mark_replicated(self)
        self.eager_reason = "model.activations_checkpoint_granularity" if cfg.activations_checkpoint_granularity else None
        self._train_mems: Optional[StreamMemory] = None  # carried across steps, by stream
        self._eval_mems: Optional[StreamMemory] = None  # within one validation pass (built on first use)
        if cfg.mem_len > 0:  # allocated now, outside any compiled step: its first call sees it as every later one
            self._memory(True).allocate(self.r_w_bias.dtype, self.r_w_bias.device)

    def _apply(self, fn, *args, **kwargs):
        """`.to()`, `.cuda()`, `.double()` ... move and cast the memory with the weights (it is
        no registered buffer: DDP would broadcast rank 0's over every replica's own streams)."""
        out = super()._apply(fn, *args, **kwargs)
        for store in (self._train_mems, self._eval_mems):
            if store is not None and store.mems is not None:
                store.mems, store.valid = fn(store.mems), fn(store.valid)
        return out

    # --- the core ---------------------------------------------------------------------------
    def empty_mems(self, bsz: int, device=None, dtype=None) -> torch.Tensor:
        p = self.r_w_bias
        return torch.zeros(self.n_layer, 0, bsz, self.d_model, device=device or p.device, dtype=dtype or p.dtype)

    def hidden(self, tokens: torch.Tensor, mems: Optional[torch.Tensor] = None, mem_len: Optional[int] = None,
               clamp_len: Optional[int] = None, same_length: Optional[bool] = None,
               mem_valid: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """(hidden states [qlen, bsz, d_model], new memory [n_layer, <= mem_len, bsz, d_model])
        for time-major `tokens` [qlen, bsz] after `mems` (None: empty). The keyword settings
        default to the training config. With `mem_valid` [bsz] (a fixed-length memory, see
        `StreamMemory`), row b's first mlen - mem_valid[b] memory positions are masked."""
        cfg = self.config
        mem_len = cfg.mem_len if mem_len is None else mem_len
        clamp_len = cfg.clamp_len if clamp_len is None else clamp_len
        same_length = cfg.same_length if same_length is None else same_length
        qlen, bsz = tokens.shape
        if mems is None:
            mems = self.empty_mems(bsz, tokens.device)
        word_emb = self.word_emb(tokens)
        mlen = mems.size(1)
        klen = mlen + qlen
        mask = attn_mask(qlen, mlen, mem_len, same_length, tokens.device)
        if mem_valid is not None:  # positions before a stream's text: [bsz, qlen, klen]
            empty = torch.arange(klen, device=tokens.device)[None, :] < (mlen - mem_valid)[:, None]
            mask = mask[None] | empty[:, None, :]
        # distances and sinusoids in fp32 (a bf16 distance is inexact above 256), then in the
        # weights' dtype: bf16 under model.megatron_amp_O2, where no autocast casts them
        pos_seq = torch.arange(klen - 1, -1, -1.0, device=tokens.device, dtype=torch.float32)
        if clamp_len > 0:
            pos_seq = pos_seq.clamp(max=clamp_len)
        core_out = self.drop(word_emb)
        pos_emb = self.drop(self.pos_emb(pos_seq).to(word_emb.dtype))
        core_out, hids = self._layers(core_out, pos_emb, mask, mems)
        core_out = self.drop(core_out)
        return core_out, update_mems(hids, mems, mem_len, 0)

    def _layers(self, x: torch.Tensor, pos_emb: torch.Tensor, mask: torch.Tensor, mems: torch.Tensor):
        """(output, every layer's input) of the layers, each over its memory; with
        `model.activations_checkpoint_granularity = "full"`, chunks of layers recomputed in
        backward (mega.runtime.recompute: "uniform" chunks of num_layers, or the first
        num_layers layers one by one for "block"). A chunk returns its layers' outputs, so
        the inputs the memory keeps come out of it."""
        cfg = self.config
        method = cfg.activations_checkpoint_method if cfg.activations_checkpoint_granularity == "full" \
            and recompute.wanted(self) else None
        k = cfg.activations_checkpoint_num_layers or 1
        size = k if method == "uniform" else 1
        hids = []
        for start in range(0, self.n_layer, size):
            chunk = range(start, min(start + size, self.n_layer))
            run = functools.partial(self._chunk, chunk, pos_emb, mask)
            layer_mems = [mems[i] for i in chunk]
            outs = recompute.checkpoint(run, x, *layer_mems) if method == "uniform" or (method == "block" and start < k) \
                else run(x, *layer_mems)
            hids += [x.detach()] + [o.detach() for o in outs[:-1]]
            x = outs[-1]
        return x, hids

    def _chunk(self, chunk: range, pos_emb, mask, x, *layer_mems) -> tuple:
        outs = []
        for i, m in zip(chunk, layer_mems):
            x = self.layers[i](x, pos_emb, self.r_w_bias, self.r_r_bias, mask, m)
            outs.append(x)
        return tuple(outs)

    # --- training ---------------------------------------------------------------------------
    def training_loss(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """The sum of masked token losses of one micro-batch, continuing its slot's memory."""
        tokens, labels = batch["tokens"].t(), batch["labels"].t()  # [qlen, bsz]
        mem_len = self.config.mem_len
        if mem_len > 0:  # every stream's memory at full length, gathered and scattered on the device
            store = self._memory(self.training)
            idx = store.index(batch, tokens.size(1), tokens.device)
            mems, valid = store.read(idx, self.r_w_bias.dtype, tokens.device)
            hidden, new_mems = self.hidden(tokens, mems, mem_valid=valid)
            store.write(idx, new_mems, (valid + tokens.size(0)).clamp(max=mem_len))
        else:
            hidden, _ = self.hidden(tokens)
        nll = self.crit.nll(hidden.reshape(-1, self.d_model), labels.reshape(-1)).view_as(labels)
        return {"loss_sum": (nll * batch["loss_mask"].t()).sum()}

    def _memory(self, training: bool) -> StreamMemory:
        """The training memory, or the one of the current validation pass, built on first use."""
        name = "_train_mems" if training else "_eval_mems"
        if getattr(self, name) is None:
            setattr(self, name, StreamMemory(self.n_layer, self.config.mem_len, self.d_model, self._stream_slots()))
        return getattr(self, name)

    def _stream_slots(self) -> int:
        """Streams one data-parallel replica reads (see `StreamMemory`), at least one per row."""
        from mega.runtime.parallel import current

        cfg = self.config
        streams = getattr(cfg.data, "streams", None) or cfg.global_batch_size or cfg.micro_batch_size
        dp = current().dp_size
        slots = streams // dp if streams % dp == 0 else streams
        return max(slots, cfg.micro_batch_size or 1)

    def train(self, mode: bool = True):
        if not mode and self._eval_mems is not None:  # each validation pass starts from an empty memory
            self._eval_mems.reset()
        return super().train(mode)

    # --- SparselyReached ---------------------------------------------------------------------
    def _parts(self, emb_hits=None, crit_hits=None) -> List[Tuple[List[torch.Tensor], object, bool]]:
        """(parameters, reached since the last take (from the taken flags), reached by every
        forward) of each adaptive part: the embedding's tables (one table with div_val 1,
        always looked up) and the softmax's buckets (the head, bucket 0, always computed)."""
        emb, crit = self.word_emb, self.crit
        parts = [(emb.bucket_params(i), emb_hits[i] if emb_hits is not None else False, emb.div_val == 1)
                 for i in range(len(emb.emb_layers))]
        parts += [(crit.bucket_params(i), crit_hits[i] if crit_hits is not None else False, i == 0)
                  for i in range(len(crit.bounds))]
        return parts

    def sparse_parameters(self) -> List[torch.Tensor]:
        """The tables, projections, output weights and biases of the buckets a batch can miss
        (a tensor shared with an always-computed part is always reached)."""
        parts = self._parts()
        always = {id(p) for params, _, every in parts if every for p in params}
        out, seen = [], set(always)
        for params, _, every in parts:
            for p in params:
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        return out

    def take_reached(self) -> List[bool]:
        recorded = self.crit.hits.recorded  # every training forward computes the head
        parts = self._parts(self.word_emb.hits.take(), self.crit.hits.take())
        hits: Dict[int, object] = {}
        for params, hit, _ in parts:  # a Python bool or a device boolean: OR-ed without reading it
            for p in params:
                hits[id(p)] = either(hits.get(id(p), False), hit)
        return [hits.get(id(p), False) if recorded else True for p in self.sparse_parameters()]

    # --- StatefulModel ----------------------------------------------------------------------
    def carried_state(self) -> Dict[str, torch.Tensor]:
        """`mems` [n_layer, mem_len, streams per replica, d_model] and `mems_valid` [streams]
        (none before the first step)."""
        return self._train_mems.state() if self._train_mems is not None else {}

    def load_carried_state(self, state: Dict[str, torch.Tensor]) -> None:
        """Also the layout before the stream buffer (`mems.{slot}` per micro-batch): converted."""
        if self.config.mem_len > 0:
            self._memory(True).load(state)

    # --- Generator --------------------------------------------------------------------------
    def new_kv_cache(self, batch: int, max_len: int) -> TXLCache:
        return TXLCache(max_len)

    def forward(self, tokens: torch.Tensor, cache: Optional[TXLCache] = None) -> torch.Tensor:
        """Log-probabilities [batch, seq, vocab] of the next token after each of `tokens`
        [batch, seq]; with `cache`, continuing (and extending) its memory."""
        t = tokens.t()
        if cache is None:
            hidden, _ = self.hidden(t, None, mem_len=0)
        else:
            hidden, cache.mems = self.hidden(t, cache.mems, mem_len=cache.max_len, same_length=False)
        logp = self.crit.log_prob(hidden.reshape(-1, self.d_model))
        return logp.view(t.size(0), t.size(1), -1).transpose(0, 1)

    # --- evaluation -------------------------------------------------------------------------
    def segment_nll(self, tokens: torch.Tensor, targets: torch.Tensor, mems: torch.Tensor, settings: dict):
        """(per-token NLL [qlen, bsz], new memory) of one time-major evaluation segment."""
        hidden, new_mems = self.hidden(tokens, mems, settings["mem_len"], settings["clamp_len"], settings["same_length"])
        nll = self.crit.nll(hidden.reshape(-1, self.d_model), targets.reshape(-1)).view_as(targets)
        return nll, new_mems

    def evaluate(self, source, split: str, tokenizer, config, torchscript: bool = False) -> Dict[str, float]:
        """mega.protocols.Evaluates: the reference's protocol over the whole `split` of an
        `lm_ordered` source at the eval_* settings, the streams shared out over the
        data-parallel ranks; with `torchscript`, through the scripted inference module
        (what `mega export --torchscript` writes), as the reference's `eval.py --type torchscript`."""
        from mega.runtime.parallel import current

        if not hasattr(source, "token_stream"):
            raise ConfigError(f"model.data.data_impl={config.model.data.data_impl!r}: transformer_xl evaluates a split"
                              " read in order; use data_impl = \"lm_ordered\"")
        stream = source.token_stream(split, tokenizer).to(self.r_w_bias.device)
        settings = {**self.config.eval_settings(), "batch_size": self.config.eval_batch_size}
        st = current()
        if settings["batch_size"] < st.dp_size:
            raise ConfigError(f"model.eval_batch_size={settings['batch_size']}: fewer streams than the"
                              f" {st.dp_size} data-parallel ranks")
        if torchscript:
            scripted = self.to_torchscript()

            def step(x, y, m):
                return scripted.nll(x, y, m)
            empty = scripted.init_mems(1)
        else:
            def step(x, y, m):
                return self.segment_nll(x, y, m, settings)
            empty = self.empty_mems(1, stream.device)
        with torch.no_grad():
            part = evaluate_ordered(step, stream, settings, empty, st.dp_rank, st.dp_size)
        totals = st.all_reduce_sum(torch.tensor([part["loss_sum"], float(part["tokens"])], dtype=torch.float64,
                                                device=stream.device))
        metrics = finish_metrics(float(totals[0]), int(totals[1]))
        metrics.update({f"eval_{k}": v for k, v in settings.items()})
        return metrics

    def to_torchscript(self, **overrides):
        """The scripted inference module (fp32) at the eval_* memory settings (keyword
        arguments mem_len, clamp_len, same_length override them)."""
        from mega.plugins.models.transformer_xl_script import script_transformer_xl

        ev = {**self.config.eval_settings(), **overrides}
        return script_transformer_xl(self, int(ev["mem_len"]), int(ev["clamp_len"]), bool(ev["same_length"]))

    @torch.no_grad()
    def evaluate_stream(self, stream: torch.Tensor, **overrides) -> Dict[str, float]:
        """The reference's evaluation of a token stream (see `evaluate_ordered`) with the
        config's eval_* settings (keyword arguments override them)."""
        settings = {**self.config.eval_settings(), "batch_size": self.config.eval_batch_size, **overrides}
        was = self.training
        self.eval()
        try:
            return finish_metrics(**evaluate_ordered(lambda x, y, m: self.segment_nll(x, y, m, settings), stream,
                                                     settings, self.empty_mems(1, stream.device)))
        finally:
            self.train(was)

    # --- FLOPs ------------------------------------------------------------------------------
    def flops_per_token(self, seq_length: int) -> float:
        """Training FLOPs per token (3 x forward): 6 x the matmul parameters a token touches
        (layers and the head softmax; tail buckets left out), the position projection r_net
        over segment + memory shared by the segment's tokens, and attention over segment +
        memory (content scores, position scores, values: 3 x 2 x n_head x d_head per key)."""
        cfg = self.config
        hd, klen = cfg.n_head * cfg.d_head, seq_length + cfg.mem_len
        layer = 4 * cfg.d_model * hd + 2 * cfg.d_model * cfg.d_inner
        head = self.crit.head()[0].numel()
        r_net = cfg.d_model * hd * klen / seq_length
        return 6.0 * (cfg.n_layer * (layer + r_net) + head) + 18.0 * cfg.n_layer * hd * klen


def evaluate_ordered(segment_nll, stream: torch.Tensor, settings: dict, empty_mems: torch.Tensor,
                     dp_rank: int = 0, dp_size: int = 1) -> Dict[str, float]:
    """NVIDIA's evaluation: `stream` (1-D token ids of a whole split) is cut into
    `batch_size` contiguous columns (the tail that does not fill a row is dropped, as the
    reference does); each column is preceded by ceil(mem_len / tgt_len) warm-up segments
    taken from the end of the previous column (its true left context) that fill the memory
    and are not scored; then every segment (the last may be shorter) is scored, carrying
    the memory. Returns this rank's summed NLL of the scored tokens (`loss_sum`) and their
    count (`tokens`); `finish_metrics` turns totals into the token-weighted `loss`,
    `perplexity` and `bpc` (loss / ln 2: bits per character for character-level data)."""
    bsz, tgt_len, mem_len = int(settings["batch_size"]), int(settings["tgt_len"]), int(settings["mem_len"])
    n_step = stream.numel() // bsz
    if n_step < 2:
        raise ConfigError(f"model.eval_batch_size={bsz}: the split has only {stream.numel()} tokens")
    data = stream[: n_step * bsz].view(bsz, n_step).t().contiguous()  # [n_step, bsz]
    warm_elems = math.ceil(mem_len / tgt_len) * tgt_len if mem_len > 0 else 0
    warm_elems = min(warm_elems, n_step)
    if warm_elems:
        data = torch.cat([data.roll((warm_elems, 1), (0, 1))[:warm_elems], data], 0)
    cols = data.chunk(dp_size, dim=1)[dp_rank] if dp_size > 1 else data
    mems = empty_mems.expand(-1, -1, cols.size(1), -1)
    loss_sum, n_tok = 0.0, 0
    for i in range(0, cols.size(0) - 1, tgt_len):
        seq_len = min(tgt_len, cols.size(0) - 1 - i)
        nll, mems = segment_nll(cols[i:i + seq_len], cols[i + 1:i + 1 + seq_len], mems)
        if i >= warm_elems:
            loss_sum += float(nll.double().sum())
            n_tok += nll.numel()
    return {"loss_sum": loss_sum, "tokens": n_tok}


def finish_metrics(loss_sum: float, tokens: int) -> Dict[str, float]:
    """loss (token mean), ppl, bpc and the token count from summed NLLs."""
    loss = loss_sum / max(tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "bpc": loss / math.log(2), "tokens": tokens}


# --- initialisation (the reference's weights_init) ------------------------------------------------


def init_weights(model: TransformerXLModel, cfg: TransformerXLConfig) -> None:
    """Linear weights, embedding tables, cluster weights and the relative biases from
    `init` (N(0, init_std) or U(-init_range, init_range)); the tables from `emb_init`
    instead when it is set (mega's option: the reference parses --emb_init but never reads
    it); projections N(0, proj_init_std); LayerNorm weights N(1, init_std); every bias 0."""
    def weight(t):
        if cfg.init == "uniform":
            nn.init.uniform_(t, -cfg.init_range, cfg.init_range)
        else:
            nn.init.normal_(t, 0.0, cfg.init_std)

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                weight(m.weight)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.LayerNorm):
                nn.init.normal_(m.weight, 1.0, cfg.init_std)
                m.bias.zero_()
            elif isinstance(m, nn.Embedding):
                if cfg.emb_init == "uniform":
                    nn.init.uniform_(m.weight, -cfg.emb_init_range, cfg.emb_init_range)
                elif cfg.emb_init == "normal":
                    nn.init.normal_(m.weight, 0.0, cfg.init_std)
                else:  # unset: as every other weight, as the reference does
                    weight(m.weight)
        for p in model.word_emb.emb_projs:
            nn.init.normal_(p, 0.0, cfg.proj_init_std)
        crit = model.crit
        for p in crit.out_projs.values():
            nn.init.normal_(p, 0.0, cfg.proj_init_std)
        for p in crit.out_layers_weights:
            weight(p)
        if crit.n_clusters > 0:
            weight(crit.cluster_weight)
            crit.cluster_bias.zero_()
        for p in crit.out_layers_biases:
            p.zero_()
        weight(model.r_w_bias)
        weight(model.r_r_bias)


# --- registration ------------------------------------------------------------------------------


def build_transformer_xl(config: TransformerXLConfig, tokenizer, plugins=None) -> TransformerXLModel:
    return TransformerXLModel(config, tokenizer.vocab_size)


@mega.hookimpl
def register_models(register):
    register("transformer_xl", build_transformer_xl, config=TransformerXLConfig)
