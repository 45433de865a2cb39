"""The `torch_dist` checkpoint format: megatron-core's distributed checkpoint layout,
written and read with `torch.distributed.checkpoint` (DCP), every rank in parallel.

    step_0000100/
      .metadata               DCP's global index: each tensor's global shape, its chunks
      __0_0.distcp, ...       the data, one file per writing rank
      metadata.json           {"sharded_backend": "torch_dist", ...}: megatron-core's marker
      common.pt               megatron's common state: args, iteration, checkpoint_version
      mega_rank_TT_PPP.pt     per model-parallel rank: trainer state (RNG, step, loss
                              scaler), the sharding record, optimizer param_groups

Under `model.optim.use_distributed_optimizer` the optimizer's state is megatron-core's
`dp_reshardable` bucket space instead, each data-parallel rank writing its own shard
(torch_dist_optimizer.py).

Tensors are stored as GLOBAL tensors under megatron-core's names (`embedding.word_embeddings.
weight`, `decoder.final_layernorm.bias`, ...): the model family's converter names them
(`mega.protocols.MegatronCoreNames`; a family without one, and names it does not know, keep
mega's global name). The layers of a megatron-core stack (`decoder.layers.{i}.X`,
`encoder.layers.{i}.X`) are written as megatron-core writes homogeneous layers, its
default: one tensor `decoder.layers.X` of global shape [layers, ...], layer i at offset i
of the first axis, so `dist_checkpointing.load(model.sharded_state_dict(), dir)` reads them
at its default strictness; the per-layer keys (megatron-core's `non_homogeneous_layers`,
and mega's files before this layout) are read too. Beside the weights of each layer's
linears megatron-core keeps an `_extra_state` object (`decoder.layers.self_attention.
linear_qkv._extra_state/shard_{i}_{layers}`); mega writes them, empty as megatron-core's
local layers' are, so its loader finds every key it asks for, and never reads them. The keys written are
recorded in every rank's file, so loading needs no converter; a checkpoint without the
record (written before it was kept) is read under the naming whose keys it holds. Each rank writes only
its own chunk: a tensor-parallel tensor at the offset `tp_rank * local size` along its
`partition_dim`, a replicated tensor by tensor-parallel rank 0 only (megatron-core's
replica_id rule). A tensor split in blocks (`partition_chunks`: a gated MLP's fc1 = [gate; up],
each half split over the ranks) is written as one chunk per block at `i * G / k + rank * G /
(k * TP)` of its global size G along the split dimension, megatron-core's layout of
`linear_fc1` (its `apply_swiglu_sharded_factory`). The tied output layer of the last pipeline stage
(`word_embeddings_for_head`) is a replica of `embedding.word_embeddings.weight`: it is not
written, and loading fills it from that key, as megatron-core's sharded `output_layer.weight`
does. Optimizer moments follow their parameter (`optimizer.state.exp_avg.<key>`); the step
count is a replicated 0-d tensor (`optimizer.state.step.<key>`).

Loading, every rank describes the chunks IT needs at the CURRENT layout (tensor-, pipeline-
and data-parallel sizes may all differ from the saved ones) and DCP reads just those byte
ranges: no process ever holds the whole model. A padded vocabulary whose size changed with
the tensor-parallel size is cut, or zero-filled past the saved rows. RNG states are
per rank and are restored only at the saved layout (like the kernel's resharding).
"""
from __future__ import annotations

import contextlib
import json
import logging
import re
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

import mega
from mega.errors import CheckpointError
from mega.checkpoint.load_errors import describe
from mega.protocols import MegatronCoreNames
from mega.plugins.checkpoints.converters import model_converter, model_converters
from mega.plugins.checkpoints.torch_dist_optimizer import (
    CONTENT_METADATA,
    bucket_space,
    model_parallel_index,
    rank_entry,
    shard_tensors,
)
from mega.runtime.bucket_space import OptimizerShards
from mega.runtime.sharding import chunks_of, renumber

log = logging.getLogger("mega.checkpoint")

PARTS = ("model", "optimizer", "trainer", "sharding")
METADATA_JSON = {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                 "common_backend": "torch", "common_backend_version": 1}
CHECKPOINT_VERSION = 3.0



def _same(name: str) -> str:
    return name


# megatron-core's layer stacks: `decoder.layers.{i}.X` (and its optimizer moments'
# `optimizer.state.exp_avg.decoder.layers.{i}.X`) are one tensor `decoder.layers.X` [layers, ...]
_STACKED = re.compile(r"^(?P<pre>(?:optimizer\.state\.\w+\.)?)(?P<stack>(?:encoder|decoder)\.layers)\.(?P<i>\d+)\.(?P<rest>.+)$")
# the linears whose `_extra_state` objects megatron-core's layers save (TE spec and local spec)
_EXTRA_STATE = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")


def _stacked(key: str) -> Optional[Tuple[str, int, str]]:
    """(stacked key, layer index, stack name) of a per-layer megatron-core key, else None."""
    m = _STACKED.match(key)
    return (f"{m['pre']}{m['stack']}.{m['rest']}", int(m["i"]), m["stack"]) if m else None


def _stack_sizes(keys, pp_size: int) -> Dict[str, int]:
    """Layers of each stack in the whole model: this stage's count times the stages (mega's
    and Megatron's stages hold equal shares)."""
    found: Dict[str, set] = {}
    for key in keys:
        st = _stacked(key)
        if st is not None:
            found.setdefault(st[2], set()).add(st[1])
    return {stack: len(ids) * pp_size for stack, ids in found.items()}


def _namer(state: dict) -> Callable[[str], str]:
    """mega's global name -> checkpoint key, by the family of the model being saved (the
    process's plugins: the kernel hands a format none)."""
    name = (state.get("config") or {}).get("model", {}).get("name")
    family = model_converter(mega.get_plugins(), name, MegatronCoreNames) if name else None
    return family.mcore_name if family is not None else _same


def _recorded(keys: Dict[str, str]) -> Callable[[str], str]:
    return lambda name: keys.get(name, name)


def _namer_for(stored, wanted: Sequence[str]) -> Callable[[str], str]:
    """For a checkpoint without a key record: the naming (a family's megatron-core names, or
    mega's own) under which every tensor `wanted` is among the `stored` keys."""
    namings = [conv.mcore_name for _, conv in model_converters(mega.get_plugins(), MegatronCoreNames)] + [_same]
    return next((n for n in namings if all(n(w) in stored for w in wanted)), _same)


def _extra_states(keys, stacks: Dict[str, int]) -> Dict[str, list]:
    """megatron-core's `_extra_state` objects of the layers' linears whose weights `keys`
    name, under its ShardedObject keys (`<stacked module>._extra_state/shard_<layer>_<layers>`),
    each what its local layers hold: nothing (`[None]`, as its writer packs a rank's objects
    in a list; DCP torch.saves it)."""
    out = {}
    for key in keys:
        st = _stacked(key)
        if st is None or not st[0].endswith(tuple(f"{m}.weight" for m in _EXTRA_STATE)) or st[0].startswith("optimizer."):
            continue
        module = st[0][: -len(".weight")]
        out[f"{module}._extra_state/shard_{st[1]}_{stacks[st[2]]}"] = [None]
    return out


def rank_file(tp_rank: int, pp_rank: int) -> str:
    return f"mega_rank_{tp_rank:02d}_{pp_rank:03d}.pt"


# --- what each rank holds: a chunk of a global tensor ----------------------------------------


def _sources(sharding: dict) -> Dict[str, str]:
    """local name -> the global name of the tensor it holds (aliases, the tied head, their source's)."""
    offset, aliases = sharding.get("layer_offset", 0), sharding.get("aliases", {})
    return {name: aliases.get(name, renumber(name, offset)) for name in sharding["partition_dims"]}


def _entries(sharding: dict, tp_size: int, tp_rank: int,
             key_of: Callable[[str], str]) -> List[Tuple[str, str, Optional[int], List[int], int]]:
    """(local name, checkpoint key, partition dim, global shape, blocks) for every tensor a
    rank of this layout holds; aliases (the tied head) name their source's key."""
    sources = _sources(sharding)
    return [(name, key_of(sources[name]), dim, list(sharding["global_shapes"][name]), chunks_of(sharding, name))
            for name, dim in sharding["partition_dims"].items()]


def _offsets(shape: Sequence[int], dim: Optional[int], tp_rank: int) -> List[int]:
    offsets = [0] * len(shape)
    if dim is not None:
        offsets[dim] = tp_rank * shape[dim]
    return offsets


def _blocks(shape: Sequence[int], dim: int, tp_size: int, tp_rank: int, chunks: int) -> List[Tuple[int, int, List[int]]]:
    """(start, length along `dim` in the local tensor of `shape`, global offsets) of each
    block of a tensor split in `chunks` blocks (module docstring)."""
    per = shape[dim] // chunks
    out = []
    for i in range(chunks):
        offsets = [0] * len(shape)
        offsets[dim] = i * per * tp_size + tp_rank * per
        out.append((i * per, per, offsets))
    return out


def _group_kwargs(parallel, saving: bool) -> dict:
    """DCP's process group: every rank that calls save/load together. The kernel saves on
    the model-parallel ranks of data-parallel replica 0 (`saving`; on every rank when it
    saves the distributed optimizer's shards) and loads on every rank."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return {"no_dist": True}
    if parallel is None or not parallel.distributed:
        raise CheckpointError("torch_dist: a distributed process group is up but the parallel layout is missing")
    if not saving or parallel.dp_size == 1:
        return {}
    ranks = tuple(p * parallel.dp_size * parallel.tp_size + t for p in range(parallel.pp_size) for t in range(parallel.tp_size))
    if ranks not in _GROUPS:  # only these ranks call save: a group they can make alone
        _GROUPS[ranks] = dist.new_group(list(ranks), use_local_synchronization=True)
    return {"process_group": _GROUPS[ranks]}


_GROUPS: Dict[tuple, object] = {}


@contextlib.contextmanager
def _one_process_is_fine():
    """DCP warns on every single-process save/load; one process is a layout we mean."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _layout(parallel) -> Tuple[int, int, int, int]:
    if parallel is None:
        return 1, 0, 1, 0
    return parallel.tp_size, parallel.tp_rank, parallel.pp_size, parallel.pp_rank


def _optimizer_keys(state_key: str, key: str) -> str:
    return f"optimizer.state.{state_key}.{key}"


# --- the format ---------------------------------------------------------------------------------


class TorchDistFormat:
    name = "torch_dist"
    saves_optimizer_shards = True  # the distributed optimizer's bucket space, each rank its own (torch_dist_optimizer.py)

    # --- mega import (mega.plugins.checkpoints.torch_dist_import) -----------------------------
    def can_import(self, source: Path) -> bool:
        from mega.plugins.checkpoints.torch_dist_import import can_import

        return can_import(Path(source))

    def import_run(self, source: Path, run_dir: Path, options, plugins) -> Path:
        from mega.plugins.checkpoints.torch_dist_import import import_run

        return import_run(Path(source), Path(run_dir), options, plugins)

    def save(self, state: dict, directory: Path, parallel=None) -> None:
        tp_size, tp_rank, pp_size, pp_rank = _layout(parallel)
        directory = Path(directory)
        sharding = state.get("sharding")
        if sharding is None:
            raise CheckpointError("torch_dist: the state has no sharding record")
        key_of = _namer(state)
        entries = _entries(sharding, tp_size, tp_rank, key_of)
        aliases = sharding.get("aliases", {})
        stacks = _stack_sizes([key for _, key, _, _, _ in entries], pp_size)
        tensors, placement = {}, {}

        def put(key, t, dim, chunks=1):
            t = t.detach().cpu() if t.device.type != "cpu" else t.detach()
            size = list(t.shape)
            if dim is not None:
                size[dim] *= tp_size
            elif tp_rank != 0:
                return  # a replica: tensor-parallel rank 0 writes it
            st = _stacked(key)
            if st is not None:  # layer i of the stack's [layers, ...] tensor
                key, t, lead, lead_size, tag = st[0], t.unsqueeze(0), [st[1]], [stacks[st[2]]], f"#{st[1]}"
            else:
                lead, lead_size, tag = [], [], ""
            if dim is None or chunks == 1:
                tensors[key + tag] = t
                placement[key + tag] = (key, lead + _offsets(t.shape[len(lead):], dim, tp_rank), lead_size + size)
                return
            for i, (start, length, offsets) in enumerate(_blocks(t.shape[len(lead):], dim, tp_size, tp_rank, chunks)):
                tensors[f"{key}{tag}#{i}"] = t.narrow(dim + len(lead), start, length).contiguous()
                placement[f"{key}{tag}#{i}"] = (key, lead + offsets, lead_size + size)

        opt = state.get("optimizer")
        shards = opt if isinstance(opt, OptimizerShards) else None  # every data-parallel rank saves its own
        if shards is not None:
            opt = None
            for key, (t, offsets, size) in shard_tensors(shards, model_parallel_index(parallel)).items():
                tensors[key], placement[key] = t, (key, offsets, size)
        replica0 = parallel is None or parallel.dp_rank == 0  # writes the model, its rank file and the common files
        model = state["model"]
        by_name = {}
        for name, key, dim, _, chunks in entries:
            by_name[name] = (key, dim, chunks)
            if name not in aliases and replica0:  # the tied head is a replica of the embedding
                put(key, model[name], dim, chunks)
        objects = _extra_states([key for _, key, _, _, _ in entries], stacks) if tp_rank == 0 and replica0 else {}
        extra_optim = {}
        names = _optimizer_param_names(state) if opt is not None else None
        if opt is not None:
            order = [i for g in opt["param_groups"] for i in g["params"]]
            for pos, i in enumerate(order):
                if i not in opt["state"]:
                    continue
                name = names[pos]
                key, dim, chunks = by_name[name]
                for k, v in opt["state"][i].items():
                    if name in aliases:
                        continue
                    if torch.is_tensor(v) and v.dim() > 0:
                        put(_optimizer_keys(k, key), v, dim, chunks)
                    elif torch.is_tensor(v):
                        put(_optimizer_keys(k, key), v, None)
                    else:
                        extra_optim.setdefault(key, {})[k] = v
        # Small per-rank state first: when dcp.save returns on rank 0, every file is complete.
        own = {"trainer": state.get("trainer", {}), "sharding": sharding,
               "layout": {"tp_size": tp_size, "tp_rank": tp_rank, "pp_size": pp_size, "pp_rank": pp_rank},
               "keys": {source: key_of(source) for source in _sources(sharding).values()}}
        if opt is not None:
            own["optimizer"] = {"param_groups": opt["param_groups"], "param_names": list(names), "extra": extra_optim}
        if shards is not None:
            own["optimizer"] = rank_entry(shards)
        if replica0:
            torch.save(own, directory / rank_file(tp_rank, pp_rank))
        if parallel is None or parallel.is_main:
            (directory / "metadata.json").write_text(json.dumps(METADATA_JSON))
            common = _common(state, parallel, sharding, directory)
            if shards is not None:
                common["content_metadata"] = dict(CONTENT_METADATA)
            torch.save(common, directory / "common.pt")
        import torch.distributed.checkpoint as dcp  # ~1 s to import: only when a checkpoint is written

        from mega.plugins.checkpoints.torch_dist_planners import ChunkSavePlanner

        with _one_process_is_fine():
            dcp.save({**tensors, **objects}, storage_writer=dcp.FileSystemWriter(str(directory)),
                     planner=ChunkSavePlanner(placement), **_group_kwargs(parallel, saving=shards is None))

    def load(self, directory: Path, parallel=None, parts: Sequence[str] = PARTS) -> dict:
        """This rank's state at the layout it was saved with."""
        tp_size, tp_rank, pp_size, pp_rank = _layout(parallel)
        own = _read_rank_file(Path(directory), tp_rank, pp_rank)
        saved = own["layout"]
        if (saved["tp_size"], saved["pp_size"]) != (tp_size, pp_size):
            raise CheckpointError(f"{directory}: saved at tensor/pipeline-parallel sizes ({saved['tp_size']},"
                                  f" {saved['pp_size']}), asked for ({tp_size}, {pp_size}); use load_resharded")
        sharding = own["sharding"]
        shapes = {n: _local_shape(sharding["global_shapes"][n], d, tp_size) for n, d in sharding["partition_dims"].items()}
        optim = own.get("optimizer") if "optimizer" in parts else None
        buckets = optim if optim and "distributed" in optim else None  # the distributed optimizer's bucket space
        if buckets is not None:
            optim = None
        state = self._read(Path(directory), parallel, sharding, shapes,
                           optim["param_names"] if optim else None, optim["param_groups"] if optim else None,
                           optim["extra"] if optim else {}, own.get("keys"))
        if buckets is not None:
            state["optimizer"] = bucket_space(Path(directory), buckets, pp_rank * tp_size + tp_rank)
        if "trainer" in parts:
            state["trainer"] = own.get("trainer", {})
        if "sharding" in parts:
            state["sharding"] = sharding
        return state

    def load_resharded(self, directory: Path, parallel, model, optimizer=None) -> dict:
        """This rank's state for `model` (built at the current layout): every rank reads only
        the chunks it holds. RNG states are not carried across layouts."""
        from mega.runtime.sharding import sharding_of
        from mega.checkpoint import optimizer_param_names

        directory = Path(directory)
        sharding = sharding_of(model, parallel)
        shapes = {n: list(t.shape) for n, t in model.state_dict().items()}
        names = groups = None
        extra: dict = {}
        owns = [_load(f) for f in sorted(directory.glob("mega_rank_*.pt"))]
        records = [own.get("keys") for own in owns]
        keys = None if not records or None in records else {k: v for r in records for k, v in r.items()}
        first = _read_rank_file(directory, 0, 0)
        buckets = "distributed" in (first.get("optimizer") or {})  # saved by the distributed optimizer
        if optimizer is not None and not buckets:
            for own in owns:
                extra.update((own.get("optimizer") or {}).get("extra", {}))
            names, groups = optimizer_param_names(model), optimizer.state_dict()["param_groups"]
        state = self._read(directory, parallel, sharding, shapes, names, groups, extra, keys)
        if optimizer is not None and buckets:
            state.update(_resharded_buckets(directory, first, parallel, model, optimizer))
        state["trainer"] = {k: v for k, v in first.get("trainer", {}).items() if k != "rng"}
        return state

    # --- reading -------------------------------------------------------------------------------
    def _read(self, directory: Path, parallel, sharding: dict, shapes: Dict[str, List[int]],
              param_names: Optional[List[str]], param_groups: Optional[list], extra: dict,
              keys: Optional[Dict[str, str]]) -> dict:
        """`keys`: the recorded global name -> key map (None: a checkpoint without one)."""
        import torch.distributed.checkpoint as dcp  # ~1 s to import: only when a checkpoint is read
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        from mega.plugins.checkpoints.torch_dist_planners import ChunkLoadPlanner

        tp_size, tp_rank, _, _ = _layout(parallel)
        try:
            metadata = dcp.FileSystemReader(str(directory)).read_metadata().state_dict_metadata
        except Exception as exc:
            raise CheckpointError(f"{directory}/.metadata: cannot be read ({type(exc).__name__}: {exc})") from None
        key_of = _recorded(keys) if keys is not None else _namer_for(metadata, sorted(set(_sources(sharding).values())))
        targets: Dict[str, torch.Tensor] = {}  # DCP key (#block) -> destination (a view of a local tensor)
        placement: Dict[str, Tuple[str, List[int]]] = {}  # the same -> (DCP key, global offsets)
        copies: List[Tuple[torch.Tensor, str]] = []  # (tensor, key) for a key wanted twice (tied head)

        def locate(key: str):
            """(DCP key, the offsets before the tensor's own: [layer] in a stack, else []),
            per-layer keys first (older files, megatron-core's non-homogeneous layers)."""
            st = _stacked(key)
            if key not in metadata and st is not None and isinstance(metadata.get(st[0]), TensorStorageMetadata):
                return st[0], [st[1]]
            return key, []

        def want(key: str, shape: List[int], dim: Optional[int], chunks: int = 1) -> torch.Tensor:
            stored, lead = locate(key)
            md = metadata.get(stored)
            if not isinstance(md, TensorStorageMetadata):
                raise CheckpointError(f"{directory}: has no tensor {key!r}")
            local = torch.zeros(shape, dtype=md.properties.dtype)
            if key in targets:
                copies.append((local, key))
                return local
            have_size = list(md.size)[len(lead):]
            if lead and md.size[0] <= lead[0]:
                raise CheckpointError(f"{directory}: {stored} holds {md.size[0]} layers, this model needs layer {lead[0]}")
            view = local[(None,) * len(lead)]  # the stack's leading axis, a view of `local`
            if chunks > 1:  # blocks of a global tensor whose size cannot change (not the vocabulary)
                wanted = [n * (tp_size if d == dim else 1) for d, n in enumerate(shape)]
                if have_size != wanted:
                    raise CheckpointError(f"{directory}: {key} has global shape {have_size}, this model needs {wanted}")
                for i, (start, length, offs) in enumerate(_blocks(shape, dim, tp_size, tp_rank, chunks)):
                    targets[f"{key}#{i}"] = view.narrow(dim + len(lead), start, length)
                    placement[f"{key}#{i}"] = (stored, lead + offs)
                return local
            offs = _offsets(shape, dim, tp_rank)
            dest = view
            for d, (o, n, have) in enumerate(zip(offs, shape, have_size)):
                want_global = n * tp_size if d == dim else n
                if have != want_global and d != dim:
                    raise CheckpointError(f"{directory}: {key} has global shape {have_size}, this model needs"
                                          f" {[s * (tp_size if i == dim else 1) for i, s in enumerate(shape)]}")
                if o + n > have:  # vocabulary padding grew: rows past the saved ones stay zero
                    dest = dest.narrow(d + len(lead), 0, max(have - o, 0))
            if dest.numel() or not shape:
                targets[key], placement[key] = dest, (stored, lead + offs)
            return local

        model = {}
        for name, key, dim, _, chunks in _entries(sharding, tp_size, tp_rank, key_of):
            model[name] = want(key, shapes[name], dim, chunks)
        state: dict = {"model": model}
        if param_names is not None:
            by_name = {name: (key, dim, chunks) for name, key, dim, _, chunks in _entries(sharding, tp_size, tp_rank, key_of)}
            prefix = "optimizer.state."
            opt_state = {}
            for pos, name in enumerate(param_names):
                key, dim, chunks = by_name[name]
                entry = {}
                st = _stacked(key)
                for stored, lead in ((key, 0),) + (((st[0], 1),) if st else ()):
                    for mkey in metadata:
                        if not (mkey.startswith(prefix) and mkey.endswith("." + stored)
                                and len(mkey) > len(prefix) + len(stored) + 1):
                            continue
                        k = mkey[len(prefix):-len(stored) - 1]
                        md = metadata[mkey]
                        if "." in k or k in entry or not isinstance(md, TensorStorageMetadata):
                            continue
                        scalar = len(md.size) == lead  # the step count
                        entry[k] = want(f"{prefix}{k}.{key}", [] if scalar else shapes[name], None if scalar else dim,
                                        1 if scalar else chunks)
                entry.update(extra.get(key, {}))
                if entry:
                    opt_state[pos] = entry
            if opt_state:
                state["optimizer"] = {"state": opt_state, "param_groups": param_groups}
            else:
                log.warning("%s: no optimizer state for this model's parameters; its moments start afresh", directory)
        try:
            with _one_process_is_fine():
                dcp.load(targets, storage_reader=dcp.FileSystemReader(str(directory)), planner=ChunkLoadPlanner(placement),
                         **_group_kwargs(parallel, saving=False))
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(f"{directory}: torch.distributed.checkpoint could not read it ({type(exc).__name__}: {exc})") from None
        for local, key in copies:  # a second tensor of the same key (the tied head): same slice
            src = targets[key][(0,) * len(locate(key)[1])]
            local[tuple(slice(0, n) for n in src.shape)].copy_(src)
        return state


def _resharded_buckets(directory: Path, first: dict, parallel, model, optimizer) -> dict:
    """The optimizer state of a distributed optimizer's checkpoint saved at another tensor
    size: every saved tensor-parallel rank's buckets unflattened into model space, merged
    and re-cut for this rank (one pipeline stage, as the kernel's resharding does)."""
    from mega.checkpoint import optimizer_param_names
    from mega.runtime.sharding import reshard_optimizer

    saved = first["layout"]
    pp_size = parallel.pp_size if parallel is not None else 1
    if saved["pp_size"] != 1 or pp_size != 1:
        log.warning("%s: optimizer state is not carried across pipeline sizes; its moments start afresh", directory)
        return {}
    names, template = optimizer_param_names(model), optimizer.state_dict()
    per_rank = [bucket_space(directory, _read_rank_file(directory, r, 0)["optimizer"], r).to_model_space(names, template["param_groups"])
                for r in range(saved["tp_size"])]
    return {"optimizer": reshard_optimizer(per_rank, names, first["sharding"], model, parallel, template)}


def _local_shape(global_shape: Sequence[int], dim: Optional[int], tp_size: int) -> List[int]:
    shape = list(global_shape)
    if dim is not None:
        shape[dim] //= tp_size
    return shape


def _load(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing from the checkpoint") from None
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot be read: {describe(exc)}") from None


def _read_rank_file(directory: Path, tp_rank: int, pp_rank: int) -> dict:
    return _load(directory / rank_file(tp_rank, pp_rank))


def _optimizer_param_names(state: dict) -> List[str]:
    """The parameter names the optimizer's integer ids refer to, in its order: the kernel's
    `mega.checkpoint.optimizer_param_names(model)` when the state carries it
    (`param_names`); else rebuilt from the state by the kernel's rule (its param_groups
    are the matrices, then the 1-D tensors, each in module order) and checked group by
    group and moment by moment. Frozen parameters and floating-point buffers are in the
    model's state but not the optimizer's: when the rebuilt names cannot be told apart
    from another order, saving is refused rather than moments filed under another tensor."""
    opt, model = state["optimizer"], state["model"]
    groups = [list(g["params"]) for g in opt["param_groups"]]
    count = sum(len(g) for g in groups)
    names = state.get("param_names")
    if names is not None:
        names = list(names)
        if len(names) != count:
            raise CheckpointError(f"torch_dist: the optimizer has {count} parameters, the state names {len(names)}")
        unknown = [n for n in names if n not in model]
        if unknown:
            raise CheckpointError(f"torch_dist: optimizer parameters not in the model's state: {', '.join(unknown[:4])}")
        _check_moments(opt, groups, names, model)
        return names
    floats = [n for n, t in model.items() if torch.is_tensor(t) and t.is_floating_point()]
    by_rule = [[n for n in floats if model[n].dim() >= 2], [n for n in floats if model[n].dim() < 2]]
    sizes = [len(g) for g in groups]
    if sizes != [len(g) for g in by_rule]:
        raise CheckpointError(
            f"torch_dist: cannot tell which parameter each optimizer entry belongs to: its param_groups hold"
            f" {sizes} parameters, the model state {[len(g) for g in by_rule]} matrices and 1-D tensors (frozen"
            " parameters or floating-point buffers?); the state needs 'param_names'"
            " (mega.checkpoint.optimizer_param_names)")
    names = by_rule[0] + by_rule[1]
    _check_moments(opt, groups, names, model)
    return names


def _check_moments(opt: dict, groups: List[list], names: List[str], model: dict) -> None:
    """Every tensor moment has its parameter's shape (a misordered name list shows here)."""
    order = [i for g in groups for i in g]
    for pos, i in enumerate(order):
        for k, v in opt["state"].get(i, {}).items():
            if torch.is_tensor(v) and v.dim() > 0 and list(v.shape) != list(model[names[pos]].shape):
                raise CheckpointError(f"torch_dist: optimizer entry {i} ({k}, shape {list(v.shape)}) does not fit"
                                      f" {names[pos]} (shape {list(model[names[pos]].shape)}): the parameter order is"
                                      " not the model's")


def _common(state: dict, parallel, sharding: dict, directory: Path) -> dict:
    """megatron's common (non-sharded) state: what its loader reads besides the tensors
    (`args` naming the tokenizer's copies in the checkpoint directory)."""
    from mega.plugins.checkpoints.megatron.args import checkpoint_tokenizer_files, megatron_args

    word = next((s for n, s in sharding["global_shapes"].items() if n.endswith("embedding.word_embeddings.weight")), None)
    trainer = state.get("trainer", {})
    tp, pp = (parallel.tp_size, parallel.pp_size) if parallel is not None else (1, 1)
    config = state.get("config", {})
    files = checkpoint_tokenizer_files(config, directory, mega.get_plugins())
    return {"args": megatron_args(config, tp, pp, state.get("vocab_size"), padded=word[0] if word else None, files=files),
            "checkpoint_version": CHECKPOINT_VERSION, "iteration": trainer.get("step", 0),
            "opt_param_scheduler": {"num_steps": trainer.get("consumed_samples", 0)}}


@mega.hookimpl
def register_checkpoint_formats(register):
    register("torch_dist", TorchDistFormat)
