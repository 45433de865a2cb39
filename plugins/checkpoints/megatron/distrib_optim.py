"""Megatron-LM's legacy `distrib_optim.pt`: the distributed optimizer's state of one
model-parallel rank, beside its `model_optim_rng.pt` (`--use-distributed-optimizer` with
`--ckpt-format torch`; megatron-core's `get_parameter_state_dp_zero` /
`load_parameter_state_from_dp_zero`).

    iter_0000100/mp_rank_00/model_optim_rng.pt   optimizer = {"optimizer": {"param_groups": [...]}}:
                                                 hyperparameters without `params`, `step` in each group
    iter_0000100/mp_rank_00/distrib_optim.pt     {"buckets_coalesced": True,
                                                  0: {(param_dtype, grad_dtype): {
                                                      "param": fp32 [numel_unpadded],  (main weights)
                                                      "exp_avg": ..., "exp_avg_sq": ...,
                                                      "numel_unpadded": int}}}

One file per model-parallel rank, written by data-parallel rank 0: per state key, the
concatenation over buckets of each bucket's unpadded part, every parameter at its offset in
the buffer (mega.runtime.param_layout), alignment gaps zero. Only the bucket-end padding
depends on the data-parallel size, and it is not stored: the file loads at any size.

mega writes the file from the model-space state the kernel gathered (the layout record the
run's distributed optimizer supplies says where each parameter goes) and keeps the record
under `model_optim_rng.pt`'s `mega` key; reading hands the kernel a `BucketSpace`, which a
run at the same layout reads its shard from and anything else unflattens. A file Megatron-LM
wrote has no record: `layout_from_args` rebuilds it by Megatron's rule from the saved `args`
and the parameters in registration order.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from mega.errors import CheckpointError
from mega.runtime.bucket_space import PARAM_KEY, BucketSpace, model_space_per_parameter, to_world, world_reader
from mega.runtime.param_layout import ParamLayout, compute_layout

FILE = "distrib_optim.pt"


def dtype_key(record: dict) -> tuple:
    """(param dtype, grad dtype) of the buffer, Megatron's key (e.g. (torch.bfloat16, torch.float32))."""
    return tuple(getattr(torch, str(s).split(".")[-1]) for s in record.get("dtype", ["torch.float32", "torch.float32"]))


def save_distrib_optim(folder: Path, state: dict, record: dict) -> dict:
    """Write `folder/distrib_optim.pt` from the kernel's model-space state (`optimizer`,
    fp32 `model` weights, `param_names`); returns Megatron's `optimizer` entry for
    model_optim_rng.pt."""
    opt = state["optimizer"]
    names = state.get("param_names") or record["names"]
    per_name = model_space_per_parameter(opt, names)
    keys = list(record.get("state_keys") or [])
    scalars = next(({k: v for k, v in st.items() if not (torch.is_tensor(v) and v.dim() > 0)} for st in per_name.values()), {})
    per_param = {}
    for name in record["names"]:
        entry = {PARAM_KEY: state["model"][name]}
        saved = per_name.get(name, {})
        for k in keys:
            entry[k] = saved[k] if k in saved else torch.zeros_like(state["model"][name], dtype=torch.float32)
        per_param[name] = entry
    world = to_world(per_param, record, [PARAM_KEY] + keys)
    world["numel_unpadded"] = sum(record["per_bucket_numel_unpadded"])
    torch.save({"buckets_coalesced": True, 0: {dtype_key(record): world}}, folder / FILE)
    step = scalars.get("step")
    groups = []
    for g in opt["param_groups"]:
        group = {k: v for k, v in g.items() if k != "params"}
        if step is not None:
            group["step"] = float(step)  # Megatron puts torch Adam's step into each group
        groups.append(group)
    return {"optimizer": {"param_groups": groups}}


def read_distrib_optim(path: Path, record: dict, optimizer_entry: Optional[dict]) -> BucketSpace:
    """The state `path` holds as a BucketSpace over `record`'s layout."""
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing from the checkpoint (the run used model.optim.use_distributed_optimizer)") from None
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot be read ({type(exc).__name__}: {exc})") from None
    layout = ParamLayout.from_record(record)
    world = _world_tensors(raw, str(path))
    want = sum(layout.per_bucket_numel_unpadded)
    if world["numel_unpadded"] != want:
        raise CheckpointError(f"{path}: holds {world['numel_unpadded']} elements per state, its layout {want}"
                              " (a parameter order, alignment or bucket size this checkpoint was not written with)")
    keys = [k for k in world if k not in ("numel_unpadded", PARAM_KEY)]
    groups = (optimizer_entry or {}).get("optimizer", {}).get("param_groups") or []
    steps = {g["step"] for g in groups if "step" in g}
    record = dict(record, state_keys=keys)
    return BucketSpace(record=record, read=world_reader(world, layout),
                       scalars={"step": float(steps.pop())} if len(steps) == 1 else {},
                       param_groups=[{k: v for k, v in g.items() if k != "step"} for g in groups])


def _world_tensors(raw, where: str) -> Dict[str, torch.Tensor]:
    if not isinstance(raw, dict) or 0 not in raw:
        raise CheckpointError(f"{where}: not a Megatron distributed-optimizer file (no buffer 0)")
    if not raw.get("buckets_coalesced", False):
        raise CheckpointError(f"{where}: the per-bucket layout Megatron-LM wrote before 2024-02 (not coalesced);"
                              " convert it with Megatron-LM's --ckpt-convert-update-legacy-dist-opt-format first")
    if len([k for k in raw if k != "buckets_coalesced"]) != 1:
        raise CheckpointError(f"{where}: holds several buffers (expert-parallel or mixed dtypes); mega reads one")
    by_dtype = raw[0]
    if len(by_dtype) != 1:
        raise CheckpointError(f"{where}: holds several (param, grad) dtypes; mega reads one")
    return next(iter(by_dtype.values()))


def layout_from_args(names: Sequence[str], shapes: Sequence[Sequence[int]], args, pp_rank: int = 0,
                     shared: Sequence[str] = ()) -> dict:
    """The layout record of a file Megatron-LM wrote (it keeps none), rebuilt by its rule
    from the saved `args`: the parameters in registration order (`names`, `shapes`), buckets
    of `ddp_bucket_size` (default max(40M, 1M x data_parallel_size)) when
    `overlap_grad_reduce`, one bucket otherwise and on pipeline stages after the first,
    the tied word embedding shared across stages in a bucket of its own (`shared`)."""
    dp = int(getattr(args, "data_parallel_size", 1) or 1)
    bucket_size = None
    if getattr(args, "overlap_grad_reduce", False) and pp_rank == 0:
        bucket_size = getattr(args, "ddp_bucket_size", None) or max(40_000_000, 1_000_000 * dp)
    pad_high = bool(getattr(args, "ddp_pad_buckets_for_high_nccl_busbw", False))
    layout = compute_layout([math.prod(s) for s in shapes], bucket_size, dp,
                            [i for i, n in enumerate(names) if n in set(shared)], pad_high)
    record = layout.record(names, shapes)
    record.update(bucket_size=bucket_size, dtype=["torch.float32", "torch.float32"])
    return record


def trained_parameters(model: Dict[str, torch.Tensor]) -> List[str]:
    """The names of a Megatron-LM model state dict that are parameters (its buffers: none
    in the legacy GPT/BERT layout but `_extra_state` entries, which are skipped)."""
    return [n for n, t in model.items() if torch.is_tensor(t) and t.is_floating_point() and not n.endswith("_extra_state")]
