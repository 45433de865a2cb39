"""A checkpoint's state for this rank, at whatever tensor/pipeline layout it was saved.

A checkpoint saved at the same layout is read as it is; one saved at another is merged
from every saved rank and re-cut for this one (model weights always, optimizer moments
when both layouts have one pipeline stage). A format that can read its own slices
(`mega.protocols.ReshardsItself`, e.g. `torch_dist`) does the re-cutting itself, so no
process ever holds the whole model.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import List, Tuple

import torch

from mega.errors import CheckpointError
from mega.protocols import ReshardsItself
from mega.runtime.bucket_space import BucketSpace
from mega.runtime.parallel import ParallelState
from mega.runtime.sharding import merge_shards, reshard_optimizer, shard_for, to_global, to_local

log = logging.getLogger("mega.checkpoint")


def decay_groups(model: torch.nn.Module) -> Tuple[List[str], List[str]]:
    """(names with weight decay, names without): Megatron's rule, no weight decay on
    biases and norm weights (1-D parameters). The optimizer's parameter order is the two
    lists one after the other."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.dim() < 2 else decay).append(name)
    return decay, no_decay


def optimizer_param_names(model: torch.nn.Module) -> list:
    """Parameter names in the optimizer's order (what its integer ids refer to)."""
    decay, no_decay = decay_groups(model)
    return decay + no_decay


def model_space(opt_state, names: List[str], template: dict) -> dict:
    """An optimizer state as per-parameter tensors: a distributed optimizer's bucket space
    (`BucketSpace`, read from a checkpoint) unflattened; a state dict as it is."""
    if isinstance(opt_state, BucketSpace):
        return opt_state.to_model_space(names, template["param_groups"])
    return opt_state


def load_resharded(fmt, path: Path, manifest: dict, parallel: ParallelState, model, optimizer=None) -> dict:
    """This rank's checkpoint state, resharded when the checkpoint was saved at another
    tensor/pipeline-parallel size: model weights and optimizer moments are merged from
    every saved rank and re-cut for this one (RNG states are not carried across layouts)."""
    saved_tp = manifest.get("tensor_model_parallel_size", 1)
    saved_pp = manifest.get("pipeline_model_parallel_size", 1)
    if (saved_tp, saved_pp) == (parallel.tp_size, parallel.pp_size):
        return fmt.load(path, parallel)
    log.info("resharding %s from tensor/pipeline-parallel sizes (%d, %d) to (%d, %d)", path, saved_tp, saved_pp,
             parallel.tp_size, parallel.pp_size)
    if isinstance(fmt, ReshardsItself):  # each rank reads only its slices; no full model in one process
        return fmt.load_resharded(path, parallel, model, optimizer)
    full, stages = {}, []
    for stage in range(saved_pp):
        ranks = [fmt.load(path, ParallelState(tp_size=saved_tp, tp_rank=r, pp_size=saved_pp, pp_rank=stage))
                 for r in range(saved_tp)]
        sharding = ranks[0].get("sharding")
        if sharding is None:
            raise CheckpointError(f"{path}: has no sharding record, so it cannot be loaded at another parallel layout")
        full.update(to_global(merge_shards([r["model"] for r in ranks], sharding), sharding))
        stages.append((ranks, sharding))
    state = {"model": shard_for(model, to_local(model, full), parallel)}
    if optimizer is not None and saved_pp == 1 and parallel.pp_size == 1 and all("optimizer" in r for r in stages[0][0]):
        ranks, sharding = stages[0]
        names, template = optimizer_param_names(model), optimizer.state_dict()
        saved = [model_space(r["optimizer"], names, template) for r in ranks]
        state["optimizer"] = reshard_optimizer(saved, names, sharding, model, parallel, template)
    elif optimizer is not None:
        log.warning("optimizer state is not carried across pipeline sizes; its moments start afresh")
    if "trainer" in stages[0][0][0]:
        state["trainer"] = {k: v for k, v in stages[0][0][0]["trainer"].items() if k != "rng"}
    return state
