"""The distributed optimizer's state in the `torch_dist` format: megatron-core's default
`dp_reshardable` sharding (`DistributedOptimizer.sharded_param_state_dp_reshardable`), bucket
space with no gather.

Per model-parallel rank i (its index in the tensor x pipeline grid, `pp_rank * tp + tp_rank`,
megatron-core's `data_parallel_group_idx`) and bucket k, one 1-D global tensor per state key:

    optimizer.distributed.dp_group_idx_{i}.gbuf_idx_0.dtype_{(param_dtype, grad_dtype)}.bucket_idx_{k}.{param,exp_avg,exp_avg_sq}

of the bucket's unpadded size; every data-parallel rank writes its own shard of it (at
offset `dp_rank * B/d`, the alignment gaps inside as zeros, the end padding cut off), so no
rank gathers anything. `common.pt` records `content_metadata = {"distrib_optim_sharding_type":
"dp_reshardable"}`; the layout record (where each parameter lies, the bucket sizes,
megatron-core's `per_bucket_numel[_unpadded]`) goes into the model-parallel rank's
`mega_rank_TT_PPP.pt`.

Reading gives the kernel a `BucketSpace` whose reader fetches ranges of those tensors on
demand: a run at the same layout (any data-parallel size: only the end padding depends on
it) reads exactly its own shard; anything else — another tensor or pipeline size, another
bucket size, a run without the distributed optimizer — reads whole buckets and unflattens
them into model space.
"""
from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Dict, List, Tuple

import torch

from mega.errors import CheckpointError
from mega.runtime.bucket_space import PARAM_KEY, BucketSpace, OptimizerShards
from mega.runtime.param_layout import ParamLayout

SHARDING_TYPE = "dp_reshardable"
CONTENT_METADATA = {"distrib_optim_sharding_type": SHARDING_TYPE}


def model_parallel_index(parallel) -> int:
    """megatron-core's data_parallel_group_idx: this rank's index in its model-parallel group."""
    if parallel is None:
        return 0
    return parallel.pp_rank * parallel.tp_size + parallel.tp_rank


def bucket_key(mp_index: int, record: dict, bucket: int, key: str) -> str:
    dtype = tuple(getattr(torch, str(s).split(".")[-1]) for s in record.get("dtype", ["torch.float32", "torch.float32"]))
    return f"optimizer.distributed.dp_group_idx_{mp_index}.gbuf_idx_0.dtype_{dtype}.bucket_idx_{bucket}.{key}"


def shard_tensors(shards: OptimizerShards, mp_index: int) -> Dict[str, Tuple[torch.Tensor, List[int], List[int]]]:
    """DCP key -> (this rank's chunk, its offsets, the global size) for every bucket and key."""
    out = {}
    layout = shards.layout
    for b, per_key in shards.tensors.items():
        offset, length = shards.unpadded_chunk(b)
        if length <= 0:
            continue  # this rank's shard of the bucket is end padding only
        for key, t in per_key.items():
            out[bucket_key(mp_index, shards.record, b, key)] = (t[:length], [offset], [layout.per_bucket_numel_unpadded[b]])
    return out


def rank_entry(shards: OptimizerShards) -> dict:
    """What the model-parallel rank's file keeps about its optimizer (hyperparameters,
    the step, the layout record with megatron-core's per-bucket sizes)."""
    layout = shards.layout
    record = dict(shards.record, per_bucket_numel=[e - s for s, e in layout.bucket_indices])
    return {"param_groups": shards.param_groups, "scalars": shards.scalars, "distributed": record,
            "sharding_type": SHARDING_TYPE}


@contextlib.contextmanager
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def bucket_space(directory: Path, entry: dict, mp_index: int) -> BucketSpace:
    """A BucketSpace over the bucket tensors of model-parallel rank `mp_index` (its rank
    file's optimizer `entry`); every read is local to the calling process (no collective)."""
    record = entry["distributed"]
    layout = ParamLayout.from_record(record)

    def read(requests):
        import torch.distributed.checkpoint as dcp

        from mega.plugins.checkpoints.torch_dist_planners import ChunkLoadPlanner

        spans: Dict[str, List[int]] = {}
        for key, b, start, end in requests:
            stop = min(end, layout.per_bucket_numel_unpadded[b])
            if stop > start:
                k = bucket_key(mp_index, record, b, key)
                lo, hi = spans.get(k, [start, stop])
                spans[k] = [min(lo, start), max(hi, stop)]
        targets = {k: torch.zeros(hi - lo, dtype=torch.float32) for k, (lo, hi) in spans.items()}
        if targets:
            try:
                with _quiet():
                    dcp.load(targets, storage_reader=dcp.FileSystemReader(str(directory)),
                             planner=ChunkLoadPlanner({k: (k, [lo]) for k, (lo, _) in spans.items()}), no_dist=True)
            except Exception as exc:
                raise CheckpointError(f"{directory}: the distributed optimizer's bucket tensors could not be read"
                                      f" ({type(exc).__name__}: {exc})") from None
        out = []
        for key, b, start, end in requests:
            t = torch.zeros(end - start, dtype=torch.float32)
            stop = min(end, layout.per_bucket_numel_unpadded[b])
            if stop > start:
                k = bucket_key(mp_index, record, b, key)
                lo = spans[k][0]
                t[:stop - start] = targets[k][start - lo:stop - lo]
            out.append(t)
        return out

    keys = [k for k in record.get("state_keys", []) if k != PARAM_KEY]
    return BucketSpace(record=dict(record, state_keys=keys), read=read, scalars=dict(entry.get("scalars") or {}),
                       param_groups=list(entry.get("param_groups") or []))
