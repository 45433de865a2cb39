"""Adaptive input embeddings and the projected adaptive log-softmax of Transformer-XL.

Large word vocabularies are cut into buckets by frequency (`cutoffs`): frequent words get
wide embeddings, rare ones narrow ones (`div_val`), each projected to the model width. The
output side mirrors it: a head softmax over the shortlist (bucket 0) plus one "cluster"
logit per tail bucket, and a softmax inside each tail bucket, so most tokens never touch
the big tail matrices. With `tie_weight` the output matrices *are* the embedding tables
(only the output biases are separate). `tie_projs[i]` shares bucket i's projection with
the embedding whether or not the weights are tied, as NVIDIA's code does (it hands the
embedding's projections to the softmax unconditionally).

Parameter names follow NVIDIA's Transformer-XL (`word_emb.emb_layers.{i}.weight`,
`word_emb.emb_projs.{i}`, `crit.cluster_weight`, `crit.out_layers_biases.{i}`,
`crit.out_projs.{i}` for untied projections), so its checkpoints map key for key.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from mega.errors import CheckpointError


def bucket_bounds(n_token: int, cutoffs: Sequence[int]) -> List[Tuple[int, int]]:
    """[(start, end)) of every bucket: cutoffs + [n_token], starting at 0."""
    ends = list(cutoffs) + [n_token]
    return list(zip([0] + ends[:-1], ends))


class AdaptiveEmbedding(nn.Module):
    """Token ids -> [.., d_proj] embeddings, scaled by sqrt(d_proj) (done here, as the
    reference does, before any dropout)."""

    def __init__(self, n_token: int, d_embed: int, d_proj: int, cutoffs: Sequence[int], div_val: int = 1):
        super().__init__()
        self.n_token, self.d_embed, self.d_proj, self.div_val = n_token, d_embed, d_proj, div_val
        self.bounds = bucket_bounds(n_token, cutoffs)
        self.emb_scale = d_proj ** 0.5
        self.emb_layers = nn.ModuleList()
        self.emb_projs = nn.ParameterList()
        if div_val == 1:
            self.emb_layers.append(nn.Embedding(n_token, d_embed))
            if d_proj != d_embed:  # one projection, only when the widths differ
                self.emb_projs.append(nn.Parameter(torch.zeros(d_proj, d_embed)))
        else:  # every bucket its own width and projection (bucket 0 included)
            for i, (lo, hi) in enumerate(self.bounds):
                d_emb_i = d_embed // div_val ** i
                self.emb_layers.append(nn.Embedding(hi - lo, d_emb_i))
                self.emb_projs.append(nn.Parameter(torch.zeros(d_proj, d_emb_i)))
        self.hits = ReachedFlags(len(self.emb_layers))  # tables a forward with gradients looked up
        self.static_shapes: Optional[bool] = None  # see `use_static_shapes`

    def static_cost(self) -> float:
        """Work per row of looking up every table (the static path) over looking up one
        (bucket 0's, what most tokens need): the projections' widths summed over bucket 0's."""
        if self.div_val == 1:
            return 1.0
        return sum(p.shape[1] for p in self.emb_projs) / self.emb_projs[0].shape[1]

    def _apply(self, fn, *args, **kwargs):
        """The reached flags move with the weights (`.to()`, `.cuda()`)."""
        out = super()._apply(fn, *args, **kwargs)
        self.hits.flags = fn(self.hits.flags)
        return out

    def bucket_params(self, i: int) -> List[torch.Tensor]:
        """Table i and its projection (div_val 1: the one table, and its projection if any)."""
        return [self.emb_layers[i].weight] + ([self.proj(i)] if self.proj(i) is not None else [])

    def proj(self, i: int) -> Optional[torch.Tensor]:
        """Bucket i's input projection [d_proj, d_emb_i] (None: no projection)."""
        if self.div_val == 1:
            return self.emb_projs[0] if len(self.emb_projs) else None
        return self.emb_projs[i]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        track = torch.is_grad_enabled()
        if self.div_val == 1:  # the one table: always reached
            embed = self.emb_layers[0](tokens)
            if len(self.emb_projs):
                embed = F.linear(embed, self.emb_projs[0])
        else:
            flat = tokens.reshape(-1)
            static = use_static_shapes(self.static_shapes)
            out = torch.zeros(flat.numel(), self.d_proj, dtype=self.emb_projs[0].dtype, device=flat.device)
            for i, (lo, hi) in enumerate(self.bounds):  # an empty bucket runs on 0 rows: zero gradients, no branch
                in_bucket = (flat >= lo) & (flat < hi)
                if track:
                    self.hits.record(i, in_bucket.any())
                if static:  # every row through every table (ids clamped into it), the bucket's rows kept
                    emb_i = F.linear(self.emb_layers[i]((flat - lo).clamp(0, hi - lo - 1)), self.emb_projs[i])
                    out = torch.where(in_bucket[:, None], emb_i.to(out.dtype), out)
                    continue
                idx = in_bucket.nonzero().squeeze(1)
                emb_i = F.linear(self.emb_layers[i](flat.index_select(0, idx) - lo), self.emb_projs[i])
                out = out.index_copy(0, idx, emb_i.to(out.dtype))
            embed = out.view(*tokens.shape, self.d_proj)
        return embed * self.emb_scale


class ProjectedAdaptiveLogSoftmax(nn.Module):
    """Hidden states -> per-token negative log-likelihoods (`nll`) or full log-probabilities
    (`log_prob`). With `emb` given, the buckets whose `tie_projs` entry is true read their
    projection from it, and with `tie_weight` every bucket reads its weight from it."""

    def __init__(self, n_token: int, d_embed: int, d_proj: int, cutoffs: Sequence[int], div_val: int = 1,
                 tie_projs: Optional[Sequence[bool]] = None, emb: Optional[AdaptiveEmbedding] = None,
                 tie_weight: bool = True):
        super().__init__()
        self.n_token, self.d_embed, self.d_proj, self.div_val = n_token, d_embed, d_proj, div_val
        self.bounds = bucket_bounds(n_token, cutoffs)
        self.shortlist = self.bounds[0][1]
        self.n_clusters = len(cutoffs)
        tie_projs = list(tie_projs) if tie_projs is not None else [False] * len(self.bounds)
        # Not registered as a submodule: the tied tensors belong to the embedding (one name each).
        object.__setattr__(self, "_emb", emb)
        self.tie_weight = tie_weight and emb is not None
        tie_weight = self.tie_weight
        if self.n_clusters > 0:
            self.cluster_weight = nn.Parameter(torch.zeros(self.n_clusters, d_embed))
            self.cluster_bias = nn.Parameter(torch.zeros(self.n_clusters))
        self.out_layers_weights = nn.ParameterList()
        self.out_layers_biases = nn.ParameterList()
        self.out_projs = nn.ParameterDict()  # untied projections only, by bucket index
        self._tied_proj = []
        if div_val == 1:
            if not tie_weight:
                self.out_layers_weights.append(nn.Parameter(torch.zeros(n_token, d_embed)))
            self.out_layers_biases.append(nn.Parameter(torch.zeros(n_token)))
            for i in range(len(self.bounds)):
                tied = d_proj != d_embed and tie_projs[i] and emb is not None
                self._tied_proj.append(tied)
                if d_proj != d_embed and not tied:
                    self.out_projs[str(i)] = nn.Parameter(torch.zeros(d_proj, d_embed))
        else:
            for i, (lo, hi) in enumerate(self.bounds):
                d_emb_i = d_embed // div_val ** i
                if not tie_weight:
                    self.out_layers_weights.append(nn.Parameter(torch.zeros(hi - lo, d_emb_i)))
                self.out_layers_biases.append(nn.Parameter(torch.zeros(hi - lo)))
                tied = tie_projs[i] and emb is not None
                self._tied_proj.append(tied)
                if not tied:
                    self.out_projs[str(i)] = nn.Parameter(torch.zeros(d_proj, d_emb_i))
        self.hits = ReachedFlags(len(self.bounds))  # buckets a forward with gradients computed
        self.static_shapes: Optional[bool] = None  # see `use_static_shapes`
        self._register_load_state_dict_pre_hook(self._refuse_separate_tied_projections)

    def _apply(self, fn, *args, **kwargs):
        """The reached flags move with the weights (`.to()`, `.cuda()`)."""
        out = super()._apply(fn, *args, **kwargs)
        self.hits.flags = fn(self.hits.flags)
        return out

    def _refuse_separate_tied_projections(self, state_dict, prefix, *args) -> None:
        """A state dict with its own projection for a bucket this module ties is one mega
        wrote before tie_projs applied to untied weights (it ignored tie_projs then): its
        projections are not the embedding's, so it loads only as it was trained."""
        for i, tied in enumerate(self._tied_proj):
            key = f"{prefix}out_projs.{i}"
            if tied and key in state_dict:
                untied = [False] * len(self._tied_proj)
                raise CheckpointError(
                    f"{key}: the checkpoint holds its own output projection for bucket {i}, which model.tie_projs"
                    f" shares with the input embedding (mega before tie_projs applied with tie_weight = false wrote"
                    f" such checkpoints); load it as it was trained with model.tie_projs={_toml_list(untied)}"
                    " (to resume its run, add exp_manager.resume_ignore_config_changes=true)")

    def bucket_params(self, i: int) -> List[torch.Tensor]:
        """The parameters bucket i's logits read (whole tensors, not slices; bucket 0 with
        the cluster rows, as `head` uses it)."""
        if self.div_val == 1:
            weight = self._emb.emb_layers[0].weight if self.tie_weight else self.out_layers_weights[0]
            bias = self.out_layers_biases[0]
        else:
            weight = self._emb.emb_layers[i].weight if self.tie_weight else self.out_layers_weights[i]
            bias = self.out_layers_biases[i]
        out = [weight, bias]
        proj = self.bucket(i)[2]
        if proj is not None:
            out.append(proj)
        if i == 0 and self.n_clusters > 0:
            out += [self.cluster_weight, self.cluster_bias]
        return out

    def bucket(self, i: int) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """(weight [V_i, d_emb_i], bias [V_i], projection [d_proj, d_emb_i] or None) of bucket i."""
        lo, hi = self.bounds[i]
        if self.div_val == 1:
            weight = self._emb.emb_layers[0].weight if self.tie_weight else self.out_layers_weights[0]
            weight, bias = weight[lo:hi], self.out_layers_biases[0][lo:hi]
        else:
            weight = self._emb.emb_layers[i].weight if self.tie_weight else self.out_layers_weights[i]
            bias = self.out_layers_biases[i]
        if self._tied_proj[i]:
            proj = self._emb.proj(i)
        else:
            proj = self.out_projs[str(i)] if str(i) in self.out_projs else None
        return weight, bias, proj

    def static_cost(self) -> float:
        """Multiply-adds per row of every bucket's logits (the static path: all rows through
        every tail) over the head's alone (what a token of bucket 0 needs): e.g. 13.4 for
        WikiText-103 base (div_val 1: the tails are 12x the head's rows), 1.8 for large
        (div_val 4; the softmaxes over the tails' 248k columns are not counted, and cost more)."""
        def macs(weight, proj):
            return weight.shape[0] * weight.shape[1] + (proj.shape[0] * proj.shape[1] if proj is not None else 0)
        weight, _, proj = self.head()
        head = macs(weight, proj)
        tails = sum(macs(self.bucket(i)[0], self.bucket(i)[2]) for i in range(1, len(self.bounds)))
        return (head + tails) / head

    def head(self) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """Bucket 0's parameters with the cluster rows appended (shortlist + n_clusters wide)."""
        weight, bias, proj = self.bucket(0)
        if self.n_clusters > 0:
            weight = torch.cat([weight, self.cluster_weight], 0)
            bias = torch.cat([bias, self.cluster_bias], 0)
        return weight, bias, proj

    def nll(self, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """[N] negative log-likelihoods of `target` [N] in token order, in fp32 (or wider)."""
        track = torch.is_grad_enabled()
        if track:
            self.hits.recorded = True  # the head (bucket 0) is always computed
        head_logprob = F.log_softmax(logits(hidden, *self.head()).to(_at_least_fp32(hidden.dtype)), -1)
        if self.n_clusters == 0:
            return -head_logprob.gather(1, target.unsqueeze(1)).squeeze(1)
        if use_static_shapes(self.static_shapes):
            return self._nll_static(hidden, target, head_logprob, track)
        nll = torch.zeros(target.shape[0], dtype=_at_least_fp32(hidden.dtype), device=hidden.device)
        for i, (lo, hi) in enumerate(self.bounds):  # an empty bucket runs on 0 rows: zero gradients, no branch
            in_bucket = (target >= lo) & (target < hi)
            idx = in_bucket.nonzero().squeeze(1)
            if track and i > 0:
                self.hits.record(i, in_bucket.any())
            target_i = (target.index_select(0, idx) - lo).unsqueeze(1)
            head_i = head_logprob.index_select(0, idx)
            if i == 0:
                logprob_i = head_i.gather(1, target_i).squeeze(1)
            else:  # the cluster column is counted from the end: bucket 1 is the last one
                tail = F.log_softmax(logits(hidden.index_select(0, idx), *self.bucket(i)).to(_at_least_fp32(hidden.dtype)), -1)
                logprob_i = head_i[:, -i] + tail.gather(1, target_i).squeeze(1)
            nll = nll.index_copy(0, idx, -logprob_i)
        return nll

    def _nll_static(self, hidden, target, head_logprob, track: bool) -> torch.Tensor:
        """`nll` with fixed shapes: every tail bucket's log-softmax on every row (targets
        clamped into it), each row keeping its own bucket's value (`torch.where`). The same
        numbers per row; a row of another bucket sends back exact zeros."""
        lo0, hi0 = self.bounds[0]
        nll = -head_logprob.gather(1, target.clamp(lo0, hi0 - 1).unsqueeze(1)).squeeze(1)
        for i in range(1, len(self.bounds)):
            lo, hi = self.bounds[i]
            in_bucket = (target >= lo) & (target < hi)
            if track:
                self.hits.record(i, in_bucket.any())
            tail = F.log_softmax(logits(hidden, *self.bucket(i)).to(_at_least_fp32(hidden.dtype)), -1)
            logprob_i = head_logprob[:, -i] + tail.gather(1, (target - lo).clamp(0, hi - lo - 1).unsqueeze(1)).squeeze(1)
            nll = torch.where(in_bucket, -logprob_i, nll)
        return nll

    def log_prob(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, n_token] log-probabilities over the whole vocabulary, in fp32 (or wider)."""
        if torch.is_grad_enabled():
            self.hits.record_all()
        head_logprob = F.log_softmax(logits(hidden, *self.head()).to(_at_least_fp32(hidden.dtype)), -1)
        if self.n_clusters == 0:
            return head_logprob
        parts = [head_logprob[:, : self.shortlist]]
        for i in range(1, len(self.bounds)):
            tail = F.log_softmax(logits(hidden, *self.bucket(i)).to(_at_least_fp32(hidden.dtype)), -1)
            parts.append(head_logprob[:, -i].unsqueeze(1) + tail)
        return torch.cat(parts, 1)


class ReachedFlags:
    """Which buckets the forwards with gradients since the last `take` had tokens in, kept
    on the device in one boolean tensor updated in place.

    A bucket no token of a batch falls in still runs, on 0 rows, so every parameter takes
    part in each backward (data parallelism expects it; the gradients are zeros, in one
    process as in several) and the step has no branch on the data (no host read, no graph
    break under torch.compile). These flags record whether a bucket had tokens, so the
    training step can leave alone the buckets no micro-batch reached
    (`mega.protocols.SparselyReached`): the reference's optimizer never sees a gradient for
    them. One tensor mutated in place (not a list of new tensors): a compiled step sees
    the same kind of object at every call, so it compiles once. `recorded`: a forward
    with gradients ran since the last take (a host flag, written and never read in the step)."""

    def __init__(self, n: int):
        self.flags = torch.zeros(n, dtype=torch.bool)
        self.recorded = False

    def record(self, i: int, hit: torch.Tensor) -> None:
        self.recorded = True
        if self.flags.device != hit.device:  # the module moved since (its first forward on the device)
            self.flags = self.flags.to(hit.device)
        self.flags[i] |= hit

    def record_all(self) -> None:
        self.recorded = True
        self.flags.fill_(True)

    def take(self) -> torch.Tensor:
        """The flags (a copy) since the last take; the record starts afresh."""
        out = self.flags.clone()
        self.flags.zero_()
        self.recorded = False
        return out


def use_static_shapes(setting: Optional[bool]) -> bool:
    """Whether the adaptive buckets run with fixed shapes (every bucket on every row, kept
    by `torch.where`) rather than on the rows that `nonzero` finds (shapes set by the data:
    one host sync per bucket, nothing a CUDA graph can capture). `setting` (the modules'
    `static_shapes`, from model.adaptive_static_shapes): True / False force it; None: under
    torch.compile only. Eager mode keeps the sparse path by default: at the WikiText-103
    shapes the static one costs 1.6-3.9x the adaptive layers' time on the CPU
    (benchmarks/bench_txl_buckets.py): the tails' logits and softmaxes on every row."""
    if setting is not None:
        return setting
    return torch.compiler.is_compiling()


def either(a, b):
    """a or b, for reached flags that are Python bools or 0-dim device booleans."""
    if a is True or b is True:
        return True
    if a is False:
        return b
    if b is False:
        return a
    return a | b


def _toml_list(flags: Sequence[bool]) -> str:
    return "[" + ",".join("true" if f else "false" for f in flags) + "]"


def _at_least_fp32(dtype: torch.dtype) -> torch.dtype:
    """Softmaxes run in fp32 under 16-bit autocast (and in fp64 for fp64 tests)."""
    return torch.promote_types(dtype, torch.float32)


def logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, proj: Optional[torch.Tensor]) -> torch.Tensor:
    """(hidden @ proj) @ weight^T + bias: the projection maps d_proj -> d_emb_i, the
    transpose of its use on the input side, so one tensor serves both directions."""
    if proj is not None:
        hidden = F.linear(hidden, proj.t())
    return F.linear(hidden, weight, bias)
