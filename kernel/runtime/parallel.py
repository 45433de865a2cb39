"""The parallel layout of this process and the collectives the training loop needs.

With one process every size is 1 and the collectives are identities. Launched (by `mega
run ... trainer.devices=N` or by torchrun), the process joins the default process group
(NCCL on GPUs, gloo on CPU) and, for now, all ranks form one data-parallel group; the
tensor- and pipeline-parallel groups of the parallel-runtime issue slot in here.
"""
from __future__ import annotations

import datetime
import os

import attrs
import torch
import torch.distributed as dist

from mega.errors import ConfigError
from mega.runtime.launch import launched


@attrs.frozen
class ParallelState:
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    dp_size: int = 1
    dp_rank: int = 0
    tp_size: int = 1
    pp_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over data-parallel ranks (a new tensor; identity with one process)."""
        if self.dp_size == 1:
            return t
        t = t.detach().clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def any(self, flag: bool) -> bool:
        """True on every rank when it is True on any (so all ranks take the same branch)."""
        if not self.distributed:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=_collective_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def init_parallel(devices: int, num_nodes: int, timeout_s: int = 600) -> ParallelState:
    if not launched():
        if devices * num_nodes != 1:
            raise ConfigError(
                f"trainer.devices={devices}, trainer.num_nodes={num_nodes}: start this with `mega run` (which"
                " launches local workers) or, across machines, `torchrun --nnodes=K --nproc-per-node=N -m mega run ...`"
            )
        return ParallelState()
    world, rank, local = (int(os.environ[k]) for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local)
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return ParallelState(world_size=world, rank=rank, local_rank=local, dp_size=world, dp_rank=rank)


def shutdown_parallel() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def pick_device(accelerator: str, local_rank: int = 0) -> torch.device:
    if accelerator == "cpu":
        return torch.device("cpu")
    if accelerator in ("gpu", "cuda"):
        if not torch.cuda.is_available():
            raise ConfigError("trainer.accelerator: \"gpu\" asked for, but torch sees no CUDA device")
        return torch.device("cuda", local_rank)
    if accelerator == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    raise ConfigError(f"trainer.accelerator: expected \"cpu\", \"gpu\" or \"auto\", got {accelerator!r}")
