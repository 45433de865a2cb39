"""A distributed optimizer's state as checkpoints store it, and the conversions to and from
model space (megatron-core's two ways of storing `DistributedOptimizer` state).

* Bucket space: per bucket of the saving run's buffer layout, one flat fp32 tensor per
  state key — `param` (the fp32 main weights) and the optimizer's own keys (`exp_avg`,
  `exp_avg_sq`) — of the bucket's unpadded size, each parameter at its buffer offset,
  alignment gaps zero. Megatron's legacy `distrib_optim.pt` concatenates the buckets of a
  buffer (`dp_zero`); its `torch_dist` default (`dp_reshardable`) keeps one tensor per
  bucket, each data-parallel rank writing its own shard. A layout record
  (`mega.runtime.param_layout.ParamLayout.record`, plus the names and shapes) travels
  with it, so any reader can unflatten it without the model that saved it.
* Model space: the optimizer state dict every non-distributed optimizer has — per
  parameter (integer ids in `mega.checkpoint.optimizer_param_names` order) tensors shaped
  like the parameter, and the scalar step.

`OptimizerShards` is what one data-parallel rank of a distributed run hands a format that
saves shards (`mega.protocols.SavesOptimizerShards`); `BucketSpace` is what a format hands
back when it reads bucket-space state: it reads ranges on demand, so a run at the same
layout reads only its own shard, and anything else turns it into model space.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import attrs
import torch

from mega.runtime.param_layout import ParamLayout

PARAM_KEY = "param"  # the fp32 main weights' key in bucket space (Megatron's)


@attrs.define(eq=False)
class OptimizerShards:
    """One data-parallel rank's part of a distributed optimizer, for saving without a
    gather: per bucket and key, the rank's contiguous shard [B/d] (fp32, on the CPU;
    zeros where no parameter lies)."""

    record: dict  # the layout record: names, shapes, buffer ranges, buckets, dp_size, keys, dtype
    dp_rank: int
    tensors: Dict[int, Dict[str, torch.Tensor]]
    scalars: dict  # per-parameter scalar state (the step count), the same for every parameter
    param_groups: list  # hyperparameters per group, without `params` (Megatron's `optimizer` entry)

    @property
    def layout(self) -> ParamLayout:
        return ParamLayout.from_record(self.record)

    def unpadded_chunk(self, bucket: int) -> Tuple[int, int]:
        """(offset in the bucket's unpadded tensor, length) of this rank's shard there;
        length 0 when the shard is end padding only."""
        layout = self.layout
        size = layout.shard_size(bucket)
        offset = self.dp_rank * size
        return offset, max(0, min(size, layout.per_bucket_numel_unpadded[bucket] - offset))


# read(requests) -> tensors: each request (key, bucket, start, end) in the bucket's unpadded
# coordinates; a range past the saved end reads as zeros.
Reader = Callable[[List[Tuple[str, int, int, int]]], List[torch.Tensor]]


@attrs.define(eq=False)
class BucketSpace:
    """Bucket-space state read back from a checkpoint (see module docstring)."""

    record: dict
    read: Reader
    scalars: dict
    param_groups: list  # saved hyperparameters, without params

    @property
    def layout(self) -> ParamLayout:
        return ParamLayout.from_record(self.record)

    @property
    def keys(self) -> List[str]:
        return list(self.record.get("state_keys", ["exp_avg", "exp_avg_sq"]))

    def per_parameter(self, keys: Optional[Sequence[str]] = None) -> Dict[str, Dict[str, torch.Tensor]]:
        """name -> key -> the parameter's whole tensor (its own shape)."""
        layout, names, shapes = self.layout, self.record["names"], self.record["shapes"]
        keys = list(keys) if keys is not None else self.keys
        requests = []
        for i, (start, end, b) in enumerate(layout.param_index_map):
            lo = start - layout.bucket_indices[b][0]
            requests += [(k, b, lo, lo + end - start) for k in keys]
        tensors = iter(self.read(requests))
        out: Dict[str, Dict[str, torch.Tensor]] = {}
        for name, shape in zip(names, shapes):
            out[name] = {k: next(tensors).view(shape) for k in keys}
        return out

    def scalars_of(self, index: int) -> Optional[dict]:
        """The scalar state (the step) of the parameter at `index` of the layout, None when
        it had no state; the record's per-parameter values when it has them (mega writes
        them), else the one step of the file (Megatron keeps one per group)."""
        per_param = self.record.get("param_scalars")
        if per_param is not None:
            return per_param[index]
        return dict(self.scalars)

    def to_model_space(self, names: Sequence[str], template_groups: list) -> dict:
        """The state dict a non-distributed optimizer over parameters `names` (its order)
        loads: moments per parameter, the scalar step, the saved hyperparameters over
        `template_groups` (the receiving optimizer's groups, whose `params` are kept)."""
        per_param = self.per_parameter()
        index = {n: i for i, n in enumerate(self.record["names"])}
        state = {}
        for pos, name in enumerate(names):
            if name not in per_param:
                continue
            scalars = self.scalars_of(index[name])
            if scalars is None:  # no step reached it: no state, as a plain optimizer's
                continue
            entry = {k: torch.tensor(v, dtype=torch.float32) if isinstance(v, (int, float)) else v for k, v in scalars.items()}
            entry.update(per_param[name])
            state[pos] = entry
        return {"state": state, "param_groups": merge_groups(template_groups, self.param_groups)}


def merge_groups(template_groups: list, saved_groups: Optional[list]) -> list:
    """`template_groups` (with their `params`) carrying the saved hyperparameters, group by
    group, when the saved groups line up with them; the template's as they are otherwise."""
    groups = [dict(g) for g in template_groups]
    if saved_groups and len(saved_groups) == len(groups):
        for g, saved in zip(groups, saved_groups):
            g.update({k: v for k, v in saved.items() if k not in ("params", "step")})
    return groups


def world_reader(world: Dict[str, torch.Tensor], layout: ParamLayout) -> Reader:
    """A reader over Megatron's coalesced `dp_zero` tensors: per key, the concatenation of
    every bucket's unpadded part."""
    offsets, total = [], 0
    for n in layout.per_bucket_numel_unpadded:
        offsets.append(total)
        total += n

    def read(requests):
        out = []
        for key, b, start, end in requests:
            t = torch.zeros(end - start, dtype=torch.float32)
            stop = min(end, layout.per_bucket_numel_unpadded[b])
            if stop > start:
                t[:stop - start] = world[key][offsets[b] + start:offsets[b] + stop]
            out.append(t)
        return out

    return read


def to_world(per_param: Dict[str, Dict[str, torch.Tensor]], record: dict, keys: Sequence[str]) -> Dict[str, torch.Tensor]:
    """Megatron's coalesced `dp_zero` tensors (per key, the buckets' unpadded parts one after
    the other, alignment gaps zero) from whole per-parameter tensors."""
    layout = ParamLayout.from_record(record)
    offsets, total = [], 0
    for n in layout.per_bucket_numel_unpadded:
        offsets.append(total)
        total += n
    world = {k: torch.zeros(total, dtype=torch.float32) for k in keys}
    for name, (start, end, b) in zip(record["names"], layout.param_index_map):
        at = offsets[b] + start - layout.bucket_indices[b][0]
        for k in keys:
            world[k][at:at + end - start] = per_param[name][k].detach().reshape(-1).float().cpu()
    return world


def model_space_per_parameter(opt_state: dict, names: Sequence[str]) -> Dict[str, Dict[str, object]]:
    """name -> the model-space optimizer state of that parameter (tensors and scalars)."""
    order = [i for g in opt_state["param_groups"] for i in g["params"]]
    return {names[pos]: opt_state["state"][i] for pos, i in enumerate(order) if i in opt_state["state"]}
