"""How a model's tensors are split across tensor-parallel ranks, and putting shards back
together at another tensor-parallel size (resharding).

Every parameter of a mega model carries `partition_dim` (see tensor_parallel.layers).
Checkpoints store, per rank, a `sharding` record: the tensor-parallel size and rank, and
the split dimension and *global* shape of every tensor — the idea of megatron-core's
sharded state dict. Loading at another size concatenates the saved shards of each tensor
along its split dimension and takes this rank's slice; the vocabulary padding (which
depends on the TP size) is cut or zero-filled to the new padded size.

Across pipeline sizes, names are made global first: a model states the global index of its
first layer (`pipeline_layer_offset`; names `...layers.{i}...` are renumbered by it) and
which of its tensors are copies of another (`state_aliases`, e.g. the last stage's
`word_embeddings_for_head.weight` of the tied word embedding), which merging drops and
loading fills from their source.

A tensor may be split in `partition_chunks` blocks (default 1): the gated MLP's fused
`fc1 = [gate; up]`, where rank r holds `[gate_r; up_r]` (megatron-core's layout), so plain
concatenation of the ranks' parts would interleave gate and up. `split_for_rank` and
`merge_ranks` take each block's share in turn; the record keeps `partition_chunks` for
such tensors only (older records, and every tensor of a model without them, read as 1).
"""
from __future__ import annotations

import re
from typing import Dict, List, Optional

import torch

from mega.protocols import PipelineStage

_LAYER = re.compile(r"((?:^|\.)layers\.)(\d+)(\.)")


def renumber(name: str, offset: int) -> str:
    return _LAYER.sub(lambda m: f"{m.group(1)}{int(m.group(2)) + offset}{m.group(3)}", name, count=1)


def split_for_rank(tensor: torch.Tensor, dim: Optional[int], tp: int, rank: int, chunks: int = 1) -> torch.Tensor:
    """Rank `rank`'s part of the global `tensor` split over `tp` ranks along `dim`: of each
    of its `chunks` equal blocks along `dim`, the rank's 1/tp, concatenated in block order."""
    if dim is None or tp == 1:
        return tensor
    if chunks == 1:
        return tensor.chunk(tp, dim=dim)[rank]
    return torch.cat([block.chunk(tp, dim=dim)[rank] for block in tensor.chunk(chunks, dim=dim)], dim=dim)


def merge_ranks(parts: List[torch.Tensor], dim: Optional[int], chunks: int = 1) -> torch.Tensor:
    """The global tensor from every rank's part (in rank order): the inverse of split_for_rank."""
    if dim is None:
        return parts[0]
    if chunks == 1:
        return torch.cat(parts, dim=dim)
    pieces = [p.chunk(chunks, dim=dim) for p in parts]
    return torch.cat([torch.cat([piece[i] for piece in pieces], dim=dim) for i in range(chunks)], dim=dim)


def chunks_of(sharding: dict, name: str) -> int:
    """The number of blocks tensor `name` is split in (1 unless the record says otherwise)."""
    return int((sharding.get("partition_chunks") or {}).get(name, 1))


def sharding_of(model: torch.nn.Module, parallel) -> dict:
    dims, shapes, chunks = {}, {}, {}
    params = dict(model.named_parameters())
    for name, tensor in model.state_dict().items():
        dim = getattr(params.get(name), "partition_dim", None)
        dims[name] = dim
        shape = list(tensor.shape)
        if dim is not None:
            shape[dim] *= parallel.tp_size
        shapes[name] = shape
        if getattr(params.get(name), "partition_chunks", 1) != 1:
            chunks[name] = params[name].partition_chunks
    record = {"tp_size": parallel.tp_size, "tp_rank": parallel.tp_rank, "pp_size": parallel.pp_size,
              "pp_rank": parallel.pp_rank, "layer_offset": _layer_offset(model), "aliases": _aliases(model),
              "partition_dims": dims, "global_shapes": shapes}
    if chunks:
        record["partition_chunks"] = chunks
    return record


def _layer_offset(model) -> int:
    return model.pipeline_layer_offset if isinstance(model, PipelineStage) else 0


def _aliases(model) -> Dict[str, str]:
    return dict(model.state_aliases) if isinstance(model, PipelineStage) else {}


def to_global(full: Dict[str, torch.Tensor], sharding: dict) -> Dict[str, torch.Tensor]:
    """A stage's merged tensors under global names (aliases dropped)."""
    offset, aliases = sharding.get("layer_offset", 0), sharding.get("aliases", {})
    return {renumber(k, offset): v for k, v in full.items() if k not in aliases}


def to_local(model: torch.nn.Module, full: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Global tensors under this model's local names (a stage's layers, its aliases)."""
    offset, aliases = _layer_offset(model), _aliases(model)
    out = {}
    for name in model.state_dict():
        source = aliases.get(name, renumber(name, offset))
        if source not in full:
            raise KeyError(f"{name} (global name {source}) is not in the checkpoint")
        out[name] = full[source]
    return out


def merge_shards(states: List[Dict[str, torch.Tensor]], sharding: dict) -> Dict[str, torch.Tensor]:
    """Full tensors from the state dicts of every tensor-parallel rank (in rank order)."""
    return {name: merge_ranks([s[name] for s in states], dim, chunks_of(sharding, name))
            for name, dim in sharding["partition_dims"].items()}


def shard_for(model: torch.nn.Module, full: Dict[str, torch.Tensor], parallel) -> Dict[str, torch.Tensor]:
    """This rank's state dict for `model` cut from full tensors; dimensions whose global
    size changed (vocabulary padding) are cut or zero-padded at the end."""
    params = dict(model.named_parameters())
    out = {}
    for name, local in model.state_dict().items():
        if name not in full:
            raise KeyError(name)
        tensor = full[name]
        dim = getattr(params.get(name), "partition_dim", None)
        target = list(local.shape)
        if dim is not None:
            target[dim] *= parallel.tp_size
        tensor = fit(tensor, target)
        chunks = getattr(params.get(name), "partition_chunks", 1)
        out[name] = split_for_rank(tensor, dim, parallel.tp_size, parallel.tp_rank, chunks).clone()
    return out


def fit(tensor: torch.Tensor, shape: List[int]) -> torch.Tensor:
    """`tensor` cut or zero-filled to `shape` (vocabulary padding differs between layouts
    and tools: padding rows are never predicted, so cutting or adding them is exact)."""
    if list(tensor.shape) == shape:
        return tensor
    for d, (have, want) in enumerate(zip(tensor.shape, shape)):
        if have > want:
            tensor = tensor.narrow(d, 0, want)
        elif have < want:
            pad = list(tensor.shape)
            pad[d] = want - have
            tensor = torch.cat([tensor, tensor.new_zeros(pad)], dim=d)
    return tensor


def optimizer_by_name(opt_state: dict, names: List[str]) -> Dict[str, dict]:
    """Per-parameter optimizer state keyed by parameter name (`names` in the optimizer's
    parameter order)."""
    order = [i for group in opt_state["param_groups"] for i in group["params"]]
    return {names[pos]: opt_state["state"][i] for pos, i in enumerate(order) if i in opt_state["state"]}


def reshard_optimizer(saved: List[dict], names: List[str], sharding: dict, model, parallel, template: dict) -> dict:
    """The optimizer state dict for this rank, from every saved tensor-parallel rank's
    (same parameter names and order at any TP size): tensors shaped like their parameter
    are merged and re-cut like it, scalars (the step count) are kept."""
    per_rank = [optimizer_by_name(s, names) for s in saved]
    params = dict(model.named_parameters())
    state = {}
    for pos, name in enumerate(names):
        if name not in per_rank[0]:
            continue
        entry = {}
        for key, value in per_rank[0][name].items():
            if torch.is_tensor(value) and value.dim() > 0:
                full = merge_ranks([r[name][key] for r in per_rank], sharding["partition_dims"][name],
                                   chunks_of(sharding, name))
                entry[key] = shard_for(_One(name, params[name]), {name: full}, parallel)[name]
            else:
                entry[key] = value
        state[pos] = entry
    return {"state": state, "param_groups": template["param_groups"]}


class _One(torch.nn.Module):
    """A one-parameter view so shard_for can cut a tensor shaped like `param`."""

    def __init__(self, name: str, param: torch.nn.Parameter):
        super().__init__()
        self._name = name
        self._param = param

    def named_parameters(self, *args, **kwargs):
        yield self._name, self._param

    def state_dict(self, *args, **kwargs):
        return {self._name: self._param.detach()}
