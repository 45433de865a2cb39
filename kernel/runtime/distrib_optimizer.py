"""The distributed optimizer (`model.optim.use_distributed_optimizer`; Megatron-LM's
`--use-distributed-optimizer`, megatron-core's `DistributedOptimizer`, ZeRO-1): the fp32
main weights and the optimizer's state are sharded over the data-parallel group, so each
replica keeps 1/d of them instead of all.

Buffers (`mega.runtime.param_layout`): every trained parameter's data becomes a view of one
flat buffer in the parameters' dtype (`param_data`: fp32, or bf16/fp16 under
`model.megatron_amp_O2`), and its fp32 main gradient (`main_grad`) a view of one flat fp32
buffer (`grad_buffer`), both laid out in reverse registration order, 64-element aligned,
cut into buckets padded to a multiple of lcm(d, 128). Rank r owns the r-th of d equal
slices of every bucket, wherever parameters begin and end. For each parameter it owns part
of, it keeps a main shard (`main`, the optimizer's parameters):

* fp32 and autocast: a view of `param_data` itself (Megatron's fp32 rule: no copy), so
  stepping it updates the model;
* `megatron_amp_O2`: an fp32 clone of that range of the original fp32 weights, which are
  then dropped (only the owned ranges survive: the whole point).

A step (Megatron's order, `mega.training.loop.train_step`):

1. `prepare`: zero the gradient buffer (and, at the first step, build all of the above,
   after resuming and `on_train_start` hooks, as `MainParams` converts then).
2. backward: a hook per parameter adds its gradient into `main_grad` and frees it (as
   under O2). In the last micro-batch a bucket whose parameters are all in starts its
   reduce-scatter (SUM) asynchronously, in bucket order, overlapping the rest of the
   backward (`model.optim.overlap_grad_sync`, buckets of `model.grad_reduce_bucket_size`
   elements; without overlap: one bucket, reduced after the backward).
3. `reduce_grads`: wait for every bucket, divide the owned slice by d (the loss was
   multiplied by d: mega's rule, exact for d a power of two), all-reduce the tied word
   embedding's owned slice over the embedding group (pipelines), and hand every main shard
   its gradient as a view of the owned slice (no copy).
4. clipping over all shards (`mega.runtime.grad_norm.clip_grad_norm(..., sharded=True)`)
   and the optimizer's step on the shards.
5. `copy_to_model`: round the main shards into `param_data` (O2) and all-gather every
   bucket in place, or, with `model.optim.overlap_param_sync`, gather each bucket when the
   next forward first reaches one of its modules (forward pre-hooks, prefetching the next
   bucket), in reverse bucket order (the first layers live in the last bucket).
   `sync_params` forces what is pending before anything reads the weights outside a
   training forward: validation, checkpoints, the end of training.

The optimizer plugin's own factory builds the optimizer over the shards, each in its
parameter's group (weight decay by the parameter's name, never by the 1-D shard's shape).
Its `model.optim` config class declares whether it can be sharded (`sharding`):
"elementwise" (AdamW: each element's update depends only on that element) or
"per_tensor_norms" (LAMB, whose trust ratio needs whole-tensor norms: each shard carries
`dp_shard_of` and the optimizer sums the shards' squared norms over the data-parallel group,
`Lamb` in mega.plugins.optim.lamb).

`DistributedOptimizer` is what the run holds as its optimizer: the inner optimizer's
`param_groups`, `step`, `zero_grad`, and state dicts in *model space* (per parameter, whole
tensors: what any non-distributed optimizer saves and loads), so checkpoints, resharding and
resuming at any data-parallel size work as for any other optimizer; formats that store
shards get `OptimizerShards` (`shards()`) and may hand back `BucketSpace`.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from mega.runtime.bucket_space import PARAM_KEY, BucketSpace, OptimizerShards, merge_groups
from mega.runtime.main_params import MainParams, _Bucket
from mega.runtime.param_layout import Owned, ParamLayout, compute_layout

SHARDABLE = ("elementwise", "per_tensor_norms")


class _DistBucket(_Bucket):
    """A bucket of both buffers: its gradient view (reduce-scattered), its parameter view
    (all-gathered) and this rank's slices of each."""

    def __init__(self, view, params, param_view, grad_shard, param_shard):
        super().__init__(view, params)
        self.param_view = param_view
        self.grad_shard = grad_shard
        self.param_shard = param_shard
        self.gather = None  # the async all-gather in flight (overlap_param_sync)
        self.stale = False  # its parameters wait for an all-gather


class DistributedMainParams(MainParams):
    """The sharded main weights and the buffers of one model-parallel rank (see module
    docstring). `build_optimizer(groups)` is the optimizer plugin's factory; `template` the
    optimizer it built over the whole fp32 parameters (its hyperparameters and, until the
    first step, the run's optimizer state dicts); `decay_names`: the parameters with
    weight decay (`mega.checkpoint.reshard.decay_groups`), in optimizer order."""

    sharded = True

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype, parallel, build_optimizer: Callable,
                 template: torch.optim.Optimizer, decay_names: Sequence[str], no_decay_names: Sequence[str],
                 bucket_size: int, overlap_grad_sync: bool = True, overlap_param_sync: bool = False):
        super().__init__(model, dtype, parallel.dp_group, parallel.dp_size,
                         bucket_size if overlap_grad_sync else 0, parallel.embedding_group)
        self.parallel = parallel
        self.dp_rank = parallel.dp_rank
        self.build_optimizer = build_optimizer
        self.template: Optional[torch.optim.Optimizer] = template
        self.decay_names, self.no_decay_names = list(decay_names), list(no_decay_names)
        self.overlap_param_sync = overlap_param_sync
        self.layout: Optional[ParamLayout] = None
        self.names: List[str] = []  # buffer parameters, registration order
        self.owned: List[Owned] = []  # this rank's ranges, one per main shard (same order as self.main)
        self.param_buffer: Optional[torch.Tensor] = None
        self.optimizer: Optional[torch.optim.Optimizer] = None  # the inner optimizer over the shards
        self.pending = None  # optimizer state loaded before the shards exist (model space or BucketSpace)
        self._gather_next = -1  # the next bucket whose all-gather to start (overlap_param_sync: reverse order)
        self._hooks = []

    # --- building (first step) -----------------------------------------------------------
    def convert(self) -> None:
        named = {}
        for name, p in self.model.named_parameters():  # tied weights: their first name
            named.setdefault(id(p), name)
        params = [p for p in self.model.parameters() if p.requires_grad and p.is_floating_point()]
        self.names = [named[id(p)] for p in params]
        shared = set()
        if self.embedding_group is not None:
            tied = self.model.shared_embedding_or_output_weight()
            shared = {i for i, p in enumerate(params) if p is tied}
        layout = compute_layout([p.numel() for p in params], self.bucket_size, self.dp_size, shared)
        self.layout = layout
        device = params[0].device if params else torch.device("cpu")
        self.param_buffer = torch.zeros(layout.numel, dtype=self.dtype, device=device)
        self.owned = layout.owned(self.dp_rank)
        owned_by_param: Dict[int, List[int]] = {}
        for k, o in enumerate(self.owned):
            owned_by_param.setdefault(o.index, []).append(k)
        low_precision = self.dtype != torch.float32
        self._template_groups = [{k: v for k, v in g.items() if k != "params"} for g in self.template.param_groups]
        self.template = None  # it holds the original parameters, which are freed one by one below
        holders: Dict[int, list] = {}  # id(original) -> [(module, name)]: tied weights have several
        if low_precision:
            for module in self.model.modules():
                for name, p in module._parameters.items():
                    if p is not None:
                        holders.setdefault(id(p), []).append((module, name))
        mains: List[Optional[torch.Tensor]] = [None] * len(self.owned)
        with torch.no_grad():
            for i, (start, end, _) in enumerate(layout.param_index_map):
                p = params[i]
                view = self.param_buffer[start:end].view_as(p)
                view.copy_(p)
                if not low_precision:
                    p.data = view  # fp32: the parameter is its place in the buffer; the main shards are views
                    continue
                for k in owned_by_param.get(i, []):  # O2: fp32 clones of the owned range, before the original goes
                    o = self.owned[k]
                    mains[k] = p.detach().reshape(-1)[o.param_start:o.param_end].clone()
                # `.data =`: the parameter points into the buffer but keeps its own version
                # counter, so an all-gather into the buffer during a forward
                # (overlap_param_sync) does not invalidate tensors autograd saved
                low = torch.nn.Parameter(torch.empty(0, dtype=self.dtype, device=device), requires_grad=True)
                low.data = view
                low.__dict__.update(p.__dict__)  # partition_dim, shared_embedding_copy, ...
                for module, name in holders.pop(id(p), []):
                    module._parameters[name] = low
                params[i] = low  # the last reference to the fp32 original: freed here, not after the loop
                del p, low
            if not low_precision:
                mains = [self.param_buffer[o.buffer_start:o.buffer_end] for o in self.owned]
        # allocated only now: at no time do the fp32 originals and both buffers coexist
        self.grad_buffer = torch.zeros(layout.numel, dtype=torch.float32, device=device)
        self.params = params
        self.main = []
        for o, t in zip(self.owned, mains):
            shard = torch.nn.Parameter(t, requires_grad=True)
            source = params[o.index]
            for attr in ("partition_dim", "shared_embedding_copy", "sequence_parallel"):
                if hasattr(source, attr):
                    setattr(shard, attr, getattr(source, attr))
            shard.dp_shard_of = (o.index, layout.numels[o.index])
            self.main.append(shard)
        for p, (start, end, _) in zip(params, layout.param_index_map):
            p.main_grad = self.grad_buffer[start:end].view_as(p)
        self.buckets = []
        for b, (start, end) in enumerate(layout.bucket_indices):
            members = [p for p, (_, _, pb) in zip(params, layout.param_index_map) if pb == b]
            lo = layout.shard_start(b, self.dp_rank)
            hi = lo + layout.shard_size(b)
            self.buckets.append(_DistBucket(self.grad_buffer[start:end], members, self.param_buffer[start:end],
                                            self.grad_buffer[lo:hi], self.param_buffer[lo:hi]))
        self._bucket_of = {id(p): b for b in self.buckets for p in b.params}
        for p in params:
            p.register_post_accumulate_grad_hook(self._grad_ready)
        # Parameters no module forward reaches — the model's own (training_loss/stage_forward
        # run no hook of the model) and those of holders without a forward (a pipeline's last
        # stage keeps the tied head's copy in a bare nn.Module, used through F.linear) — have
        # their buckets gathered at the first hook of a step.
        unhooked = [m for m in self.model.modules() if m is self.model or type(m).forward is torch.nn.Module.forward]
        self._root_buckets = list({id(self._bucket_of[id(p)]): self._bucket_of[id(p)] for m in unhooked
                                   for p in m.parameters(recurse=False) if id(p) in self._bucket_of}.values())
        if self.overlap_param_sync and self.dp_size > 1:
            for module in self.model.modules():
                if any(id(p) in self._bucket_of for p in module.parameters(recurse=False)):
                    self._hooks.append(module.register_forward_pre_hook(self._before_forward))
        if self.embedding_group is not None:
            self.shared = self.model.shared_embedding_or_output_weight()
        self.converted = True
        self._build_optimizer()

    def _build_optimizer(self) -> None:
        by_name = {self.names[o.index]: shard for o, shard in zip(self.owned, self.main)}
        template_groups = self._template_groups
        groups = []
        for names, tg in zip((self.decay_names, self.no_decay_names), template_groups):
            group = {k: v for k, v in tg.items() if k != "params"}
            group["params"] = [by_name[n] for n in names if n in by_name]
            groups.append(group)
        self.optimizer = self.build_optimizer(groups)
        for g, tg in zip(self.optimizer.param_groups, groups):  # the template's values (the lr of this step)
            g.update({k: v for k, v in tg.items() if k != "params"})
        self.optimizer.dp_shards = self  # sharded optimizers (LAMB) find the data-parallel group here
        if self.pending is not None:
            pending, self.pending = self.pending, None
            self.load_optimizer_state(pending)

    @property
    def num_params(self) -> int:
        """Parameters in the buffers (P: a sharded optimizer's per-parameter tables)."""
        return len(self.params)

    @property
    def split_mask(self) -> List[bool]:
        """Per buffer parameter: split over tensor-parallel ranks (`partition_dim` set)."""
        return [getattr(p, "partition_dim", None) is not None for p in self.params]

    @property
    def device(self) -> torch.device:
        return self.grad_buffer.device

    # --- a step -----------------------------------------------------------------------------
    def _start(self, bucket: _DistBucket) -> None:
        bucket.handle = dist.reduce_scatter_tensor(bucket.grad_shard, bucket.view, group=self.dp_group, async_op=True)
        self._next += 1

    def reduce_grads(self) -> List[torch.nn.Parameter]:
        """After the last micro-batch's backward: each main shard's gradient, the owned slice
        of the reduced buffer averaged over replicas; returns the shards that have one."""
        if self.dp_size > 1:
            while self._next < len(self.buckets):
                self._start(self.buckets[self._next])
            for b in self.buckets:
                b.handle.wait()
                b.handle = None
                b.grad_shard.div_(self.dp_size)
        if self.shared is not None:  # the tied word embedding: first stage's + last stage's owned slice
            o = next((o for o in self.owned if self.params[o.index] is self.shared), None)
            piece = self.shared.main_grad.view(-1)[o.param_start:o.param_end] if o is not None else self.shared.main_grad[:0]
            dist.all_reduce(piece, group=self.embedding_group)
            self.shared.main_grad_used = True
        stepped = []
        for o, shard in zip(self.owned, self.main):
            p = self.params[o.index]
            use = p.main_grad_used or self.dp_size > 1
            shard.grad = self.grad_buffer[o.buffer_start:o.buffer_end] if use else None
            if use:
                stepped.append(shard)
        return stepped

    def mains_of(self, params) -> List[torch.nn.Parameter]:
        """This rank's main shards of these model parameters (none for a parameter it owns
        no part of)."""
        index = {id(p): i for i, p in enumerate(self.params)}
        wanted = {index[id(p)] for p in params}
        return [shard for o, shard in zip(self.owned, self.main) if o.index in wanted]

    @torch.no_grad()
    def copy_to_model(self) -> None:
        """Round the stepped main shards into the parameter buffer (O2), then all-gather
        every bucket (or leave that to the next forward, with overlap_param_sync)."""
        if self.dtype != torch.float32 and self.main:
            views = [self.param_buffer[o.buffer_start:o.buffer_end] for o in self.owned]
            torch._foreach_copy_(views, self.main)
        if self.dp_size == 1:
            return
        if self.overlap_param_sync:
            for b in self.buckets:
                b.stale = True
            self._gather_next = len(self.buckets) - 1
            return
        for b in self.buckets:
            dist.all_gather_into_tensor(b.param_view, b.param_shard, group=self.dp_group)

    def _start_gather(self) -> None:
        b = self.buckets[self._gather_next]
        b.gather = dist.all_gather_into_tensor(b.param_view, b.param_shard, group=self.dp_group, async_op=True)
        self._gather_next -= 1

    def _finish_gather(self, bucket: _DistBucket) -> None:
        """Wait for `bucket`'s all-gather, starting it (and every bucket before it in the
        chain, so every replica issues them in one order) if needed; then prefetch the next."""
        while bucket.stale and bucket.gather is None:
            self._start_gather()
        if bucket.gather is not None:
            bucket.gather.wait()
            bucket.gather, bucket.stale = None, False
        if self._gather_next >= 0 and self.buckets[self._gather_next].gather is None:
            self._start_gather()

    def _before_forward(self, module, args) -> None:
        if self._gather_next < 0 and not any(b.stale for b in self.buckets):
            return
        for b in self._root_buckets:
            if b.stale:
                self._finish_gather(b)
        for p in module.parameters(recurse=False):
            b = self._bucket_of.get(id(p))
            if b is not None and b.stale:
                self._finish_gather(b)

    def sync_params(self) -> None:
        """Finish every all-gather a forward has not yet needed (before validation,
        checkpoints and the end of training read the weights)."""
        if not self.converted:
            return
        for b in reversed(self.buckets):
            if b.stale:
                self._finish_gather(b)

    # --- model weights in checkpoints ---------------------------------------------------------
    def state_dict(self) -> dict:
        """The model's state dict with fp32 weights (a collective over the data-parallel
        group under O2: the main shards are gathered bucket by bucket)."""
        self.sync_params()
        if not self.converted or self.dtype == torch.float32:
            return {k: v.detach() for k, v in self.model.state_dict(keep_vars=True).items()}
        full = self.gather_flat([[m.detach() for m in self.main]], to_all=True)[0]
        whole = {}
        for i, (p, (start, end, _)) in enumerate(zip(self.params, self.layout.param_index_map)):
            whole[id(p)] = full[start:end].view_as(p)
        return {k: whole.get(id(v), v).detach() for k, v in self.model.state_dict(keep_vars=True).items()}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Load fp32 weights into the model (before the first step) or into the main shards
        and the parameter buffer (after)."""
        self.model.load_state_dict(state)  # O2 after conversion: rounded into the parameter buffer
        if self.converted and self.dtype != torch.float32:
            named = self.model.state_dict(keep_vars=True)
            index = {id(p): i for i, p in enumerate(self.params)}
            for k, v in named.items():
                i = index.get(id(v))
                if i is None or k not in state:
                    continue
                for o, shard in zip(self.owned, self.main):
                    if o.index == i:
                        shard.copy_(state[k].reshape(-1)[o.param_start:o.param_end])

    def gather_flat(self, per_shard: List[List[torch.Tensor]], to_all: bool = False) -> List[Optional[torch.Tensor]]:
        """For each list of per-shard tensors (one per main shard, e.g. a moment): the whole
        flat fp32 buffer, assembled bucket by bucket (all_gather, or gather to data-parallel
        rank 0, which alone gets it; the others get None)."""
        out = []
        for tensors in per_shard:
            device = self.grad_buffer.device
            full = torch.zeros(self.layout.numel, dtype=torch.float32, device=device) if (to_all or self.dp_rank == 0) else None
            for bi, b in enumerate(self.buckets):
                local = torch.zeros(b.grad_shard.numel(), dtype=torch.float32, device=device)
                lo = self.layout.shard_start(bi, self.dp_rank)
                for o, t in zip(self.owned, tensors):
                    if o.bucket == bi:
                        local[o.buffer_start - lo:o.buffer_end - lo] = t.reshape(-1)
                start, end = self.layout.bucket_indices[bi]
                if self.dp_size == 1:
                    full[start:end] = local
                elif to_all:
                    dist.all_gather_into_tensor(full[start:end], local, group=self.dp_group)
                else:
                    parts = list(full[start:end].chunk(self.dp_size)) if self.dp_rank == 0 else None
                    dist.gather(local, parts, group_dst=0, group=self.dp_group)
            out.append(full)
        return out

    def tensors(self):
        """Every tensor this layout adds to the model's: main shards (O2; fp32's are views),
        the gradient and the parameter buffers."""
        if self.dtype != torch.float32:
            yield from self.main
        for t in (self.grad_buffer, self.param_buffer):
            if t is not None:
                yield t

    # --- optimizer state: model space, shards, bucket space ---------------------------------
    def state_keys(self) -> List[str]:
        """The optimizer's per-element state keys (tensors shaped like a parameter)."""
        for st in self.optimizer.state.values():
            return [k for k, v in st.items() if torch.is_tensor(v) and v.dim() > 0]
        return []

    def _agreed_keys(self) -> List[str]:
        """The per-element state keys as any rank has them (a rank whose slices are all
        padding, or whose shards no step has reached, holds none, yet takes part in every
        gather)."""
        keys = [None] * self.dp_size
        dist.all_gather_object(keys, self.state_keys(), group=self.dp_group)
        return next((k for k in keys if k), [])

    def param_scalars(self) -> List[Optional[dict]]:
        """Per buffer parameter: its scalar state ({"step": float}), or None when no step
        has reached it yet (a parameter whose gradient is dropped, Transformer-XL's
        unreached adaptive clusters, keeps none and is skipped). Every rank's shards of a
        parameter agree; the table is reduced over the data-parallel group (a collective)."""
        keys = sorted({k for st in self.optimizer.state.values() for k, v in st.items()
                       if not (torch.is_tensor(v) and v.dim() > 0)})
        if self.dp_size > 1:
            gathered = [None] * self.dp_size
            dist.all_gather_object(gathered, keys, group=self.dp_group)
            keys = sorted({k for ks in gathered for k in ks})
        table = torch.full((len(self.params), 1 + len(keys)), -1.0, dtype=torch.float64, device=self.device)
        for o, shard in zip(self.owned, self.main):
            st = self.optimizer.state.get(shard)
            if st:
                table[o.index, 0] = 1.0
                for j, k in enumerate(keys):
                    table[o.index, 1 + j] = float(st[k])
        if self.dp_size > 1:
            dist.all_reduce(table, op=dist.ReduceOp.MAX, group=self.dp_group)
        rows = table.cpu().tolist()
        return [None if row[0] < 0 else {k: row[1 + j] for j, k in enumerate(keys)} for row in rows]

    def optimizer_state_dict(self) -> dict:
        """Model space (a collective: the moments are gathered to data-parallel rank 0,
        whose state dict is whole; the other ranks' hold no state)."""
        if not self.converted:
            if self.pending is not None:
                return self._pending_model_space()
            return self.template.state_dict()
        inner = self.optimizer.state_dict()
        names = self.decay_names + self.no_decay_names
        groups = [dict(g) for g in inner["param_groups"]]
        sizes = [len(self.decay_names), len(self.no_decay_names)]
        start = 0
        for g, n in zip(groups, sizes):  # ids of every parameter (model space), not of this rank's shards
            g["params"] = list(range(start, start + n))
            start += n
        if self.dp_size == 1:  # no gather: each shard is its whole parameter
            by_index = {o.index: shard for o, shard in zip(self.owned, self.main)}
            index_of = {n: i for i, n in enumerate(self.names)}
            state = {}
            for pos, name in enumerate(names):
                shard = by_index.get(index_of.get(name))
                st = self.optimizer.state.get(shard) if shard is not None else None
                if st:
                    p = self.params[index_of[name]]
                    state[pos] = {k: (v.view_as(p).clone() if torch.is_tensor(v) and v.dim() > 0 else v.clone() if torch.is_tensor(v) else v)
                                  for k, v in st.items()}
            return {"state": state, "param_groups": groups}
        keys = self._agreed_keys()
        scalars = self.param_scalars()
        if not keys:  # no step yet
            return {"state": {}, "param_groups": groups}
        flats = self.gather_flat([[self._moment(s, k) for s in self.main] for k in keys])
        state = {}
        if self.dp_rank == 0:
            index_of = {n: i for i, n in enumerate(self.names)}
            for pos, name in enumerate(names):
                i = index_of[name]
                if scalars[i] is None:  # no step reached it: no state, as a plain optimizer's
                    continue
                start_, end, _ = self.layout.param_index_map[i]
                entry = {k: torch.tensor(v, dtype=torch.float32) for k, v in scalars[i].items()}
                for k, flat in zip(keys, flats):
                    entry[k] = flat[start_:end].view_as(self.params[i]).clone()
                state[pos] = entry
        return {"state": state, "param_groups": groups}

    def _moment(self, shard: torch.Tensor, key: str) -> torch.Tensor:
        """A shard's per-element state `key`, zeros for a shard no step has reached."""
        st = self.optimizer.state.get(shard)
        return st[key] if st and key in st else torch.zeros_like(shard, dtype=torch.float32)

    def _pending_model_space(self) -> dict:
        pending = self.pending
        if isinstance(pending, BucketSpace):
            return pending.to_model_space(self.decay_names + self.no_decay_names, self.template.state_dict()["param_groups"])
        return pending

    def shards(self) -> OptimizerShards:
        """This rank's shards, for a format that saves them as they are (no gather of
        tensors; a collective for the layout record's per-parameter steps)."""
        keys = self._agreed_keys() if self.dp_size > 1 else self.state_keys()
        tensors = {}
        for bi, b in enumerate(self.buckets):
            lo = self.layout.shard_start(bi, self.dp_rank)
            per_key = {}
            for k in [PARAM_KEY] + keys:
                local = torch.zeros(b.grad_shard.numel(), dtype=torch.float32)
                for o, shard in zip(self.owned, self.main):
                    if o.bucket == bi:
                        t = shard if k == PARAM_KEY else self._moment(shard, k)
                        local[o.buffer_start - lo:o.buffer_end - lo] = t.detach().reshape(-1).float().cpu()
                per_key[k] = local
            tensors[bi] = per_key
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.state_dict()["param_groups"]]
        record = self.layout_record(keys)
        steps = [ps for ps in record["param_scalars"] if ps]
        scalars = {k: max(ps[k] for ps in steps) for k in steps[0]} if steps else {}  # Megatron keeps one step
        return OptimizerShards(record=record, dp_rank=self.dp_rank, tensors=tensors, scalars=scalars, param_groups=groups)

    def layout_record(self, keys: Optional[List[str]] = None) -> dict:
        """The layout record checkpoints keep (param_layout.ParamLayout.record, plus the
        bucket size, the optimizer's state keys, the buffer's (param, grad) dtypes and each
        parameter's scalar state, `param_scalars`). A collective over the data-parallel group."""
        if keys is None:
            keys = self._agreed_keys() if self.dp_size > 1 else self.state_keys()
        record = self.layout.record(self.names, [list(p.shape) for p in self.params])
        record.update(bucket_size=self.bucket_size or None, state_keys=list(keys),
                      dtype=[str(self.dtype), str(torch.float32)], param_scalars=self.param_scalars())
        return record

    def load_optimizer_state(self, state) -> None:
        """Model-space state (any optimizer's state dict of these parameters) or BucketSpace:
        kept until the shards exist, then each shard takes its range."""
        if not self.converted:
            self.pending = state
            return
        names = self.decay_names + self.no_decay_names
        inner = self.optimizer.state_dict()
        index_of = {n: i for i, n in enumerate(self.names)}
        shard_id = {id(s): i for i, s in enumerate(p for g in self.optimizer.param_groups for p in g["params"])}
        if isinstance(state, BucketSpace) and state.layout.same_buckets(self.layout) and state.record["names"] == self.names:
            new_state = self._bucket_slices(state, shard_id)
            saved_groups = state.param_groups
        else:
            if isinstance(state, BucketSpace):
                state = state.to_model_space(names, self.template_groups())
            per_param = {}
            order = [i for g in state["param_groups"] for i in g["params"]]
            for pos, i in enumerate(order):
                if i in state["state"]:
                    per_param[names[pos]] = state["state"][i]
            new_state = {}
            for o, shard in zip(self.owned, self.main):
                entry = per_param.get(self.names[o.index])
                if entry is None:
                    continue
                new_state[shard_id[id(shard)]] = {
                    k: (v.reshape(-1)[o.param_start:o.param_end].clone() if torch.is_tensor(v) and v.dim() > 0 else v)
                    for k, v in entry.items()}
            saved_groups = state["param_groups"]
        self.optimizer.load_state_dict({"state": new_state, "param_groups": merge_groups(inner["param_groups"], saved_groups)})

    def template_groups(self) -> list:
        n = len(self.decay_names)
        return [{"params": list(range(n))}, {"params": list(range(n, n + len(self.no_decay_names)))}]

    @torch.no_grad()
    def _bucket_slices(self, space: BucketSpace, shard_id: Dict[int, int]) -> dict:
        """Each shard's state read straight from the saved bucket tensors: the same buckets,
        so this rank reads only its own slice (and, under O2, its fp32 main weights)."""
        keys = space.keys
        with_param = self.dtype != torch.float32
        wanted = keys + ([PARAM_KEY] if with_param else [])
        requests = []
        for o in self.owned:
            lo = self.layout.bucket_indices[o.bucket][0]
            requests += [(k, o.bucket, o.buffer_start - lo, o.buffer_end - lo) for k in wanted]
        tensors = iter(space.read(requests))
        state = {}
        for o, shard in zip(self.owned, self.main):
            scalars = space.scalars_of(o.index)
            entry = {k: torch.tensor(v, dtype=torch.float32) if isinstance(v, (int, float)) else v
                     for k, v in (scalars or {}).items()}
            for k in wanted:
                t = next(tensors)
                if k == PARAM_KEY:
                    shard.copy_(t)
                else:
                    entry[k] = t
            if scalars is not None:  # a parameter no step reached keeps no state
                state[shard_id[id(shard)]] = entry
        return state




class DistributedOptimizer:
    """The run's optimizer under `use_distributed_optimizer`: the inner optimizer over this
    rank's shards (built at the first step), its state dicts in model space. Until then, the
    optimizer the plugin built over the whole parameters stands in (hyperparameters, an
    empty state dict), and loaded state waits for the shards."""

    def __init__(self, main: DistributedMainParams):
        self.main = main

    @property
    def _inner(self) -> torch.optim.Optimizer:
        return self.main.optimizer if self.main.optimizer is not None else self.main.template

    @property
    def param_groups(self) -> list:
        return self._inner.param_groups

    @property
    def state(self):
        return self._inner.state

    @property
    def defaults(self) -> dict:
        return self._inner.defaults

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._inner.zero_grad(set_to_none=set_to_none)

    def step(self, closure=None):
        return self.main.optimizer.step(closure)

    def state_dict(self) -> dict:
        """Model space: the same as a non-distributed optimizer's state dict (a collective
        over the data-parallel group once the shards exist; whole on its rank 0 only)."""
        return self.main.optimizer_state_dict()

    def load_state_dict(self, state) -> None:
        self.main.load_optimizer_state(state)

    def shards(self) -> OptimizerShards:
        return self.main.shards()

    def __repr__(self) -> str:
        return f"DistributedOptimizer({type(self._inner).__name__}, dp_size={self.main.dp_size})"
