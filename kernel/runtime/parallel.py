"""The parallel layout of this process and the collectives the training loop needs.

With one process every size is 1 and the collectives are identities. Launched (by `mega
run ... trainer.devices=N` or by torchrun), the process joins the default process group
(NCCL on GPUs, gloo on CPU) and every rank joins its tensor-, data- and pipeline-parallel
groups (and, with pipelines, the embedding group of the first and last stage), computed by
`rank_groups` in Megatron-LM's rank order.
"""
from __future__ import annotations

import contextlib
import datetime
import os

import attrs
import torch
import torch.distributed as dist

from mega.errors import ConfigError
from mega.runtime.launch import launched


@attrs.frozen
class ParallelState:
    """Sizes, ranks and process groups. Rank order is Megatron-LM's: tensor-parallel ranks
    adjacent, then data-parallel, then pipeline-parallel:
    rank = pp_rank * (dp_size * tp_size) + dp_rank * tp_size + tp_rank."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    dp_size: int = 1
    dp_rank: int = 0
    tp_size: int = 1
    tp_rank: int = 0
    pp_size: int = 1
    pp_rank: int = 0
    tp_group: object = None
    dp_group: object = None
    pp_group: object = None
    pp_ranks: tuple = (0,)  # global ranks of this process's pipeline, first stage first
    embedding_group: object = None  # first + last stage of this pipeline (tied word embedding)

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

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
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.dp_group)
        return t

    def any(self, flag: bool) -> bool:
        """True on every rank when it is True on any (so all ranks take the same branch)."""
        if not self.distributed:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=_collective_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def max_int(self, value: int) -> int:
        """The largest of every rank's `value` (a small non-negative integer), on every rank."""
        return self.max_ints(value)[0]

    def max_ints(self, *values: int) -> tuple:
        """The largest of every rank's value at each position (small non-negative integers),
        on every rank, in one all-reduce: several decisions every rank must take alike."""
        if not self.distributed:
            return tuple(int(v) for v in values)
        t = torch.tensor([float(v) for v in values], device=_collective_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return tuple(int(v) for v in t.tolist())

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    @contextlib.contextmanager
    def main_rank_first(self):
        """Run the block on rank 0, then on every other rank: what rank 0 writes (a run
        directory, data indexes, a trained tokenizer) the others then find on disk."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


_CURRENT = ParallelState()


def current() -> ParallelState:
    """The layout of this process (set by init_parallel; single-process by default).
    Tensor-parallel layers read their group and rank from here, as megatron-core's
    parallel_state does."""
    return _CURRENT


def set_current(state: ParallelState) -> ParallelState:
    global _CURRENT
    _CURRENT = state
    return state


@contextlib.contextmanager
def one_process():
    """Build models as one process would (tensor and pipeline size 1) inside the block,
    whatever this process's layout: converters hold a whole model's tensors at one process
    (`mega import`, and a one-file checkpoint opened by each rank of a parallel run)."""
    previous = current()
    set_current(ParallelState())
    try:
        yield
    finally:
        set_current(previous)


def layout(world: int, tp: int, pp: int) -> int:
    """The data-parallel size, or a ConfigError naming the keys when sizes do not divide."""
    if tp < 1 or pp < 1:
        raise ConfigError(f"model.tensor_model_parallel_size={tp}, model.pipeline_model_parallel_size={pp}: must be at least 1")
    if world % (tp * pp):
        raise ConfigError(
            f"world size {world} is not divisible by model.tensor_model_parallel_size={tp} x"
            f" model.pipeline_model_parallel_size={pp}"
        )
    return world // (tp * pp)


def rank_groups(tp: int, dp: int, pp: int) -> list:
    """(kind, global ranks) of every tensor-, data- and pipeline-parallel group, and of the
    embedding group (first + last stage of each pipeline), in Megatron's rank order."""
    def rank(t, d, p):
        return p * dp * tp + d * tp + t

    out = [("tp", [rank(t, d, p) for t in range(tp)]) for p in range(pp) for d in range(dp)]
    out += [("dp", [rank(t, d, p) for d in range(dp)]) for p in range(pp) for t in range(tp)]
    pipelines = [[rank(t, d, p) for p in range(pp)] for d in range(dp) for t in range(tp)]
    out += [("pp", ranks) for ranks in pipelines]
    if pp > 1:
        out += [("embedding", [ranks[0], ranks[-1]]) for ranks in pipelines]
    return out


def init_parallel(devices: int, num_nodes: int, timeout_s: int = 600, tp: int = 1, pp: int = 1,
                  accelerator: str = "auto") -> ParallelState:
    """Join the process group (NCCL when this run's `accelerator` resolves to CUDA, else
    gloo) and every parallel group of this rank; one process: only the layout check. An
    srun task (`mega.runtime.slurm`) joins as the worker of its SLURM_PROCID."""
    from mega.runtime.slurm import adopt_srun_task

    adopt_srun_task(devices, num_nodes)
    if not launched():
        if devices * num_nodes != 1:
            raise ConfigError(
                f"trainer.devices={devices}, trainer.num_nodes={num_nodes}: start this with `mega run` (which"
                " launches local workers) or, across machines, `torchrun --nnodes=K --nproc-per-node=N -m mega run ...`"
                " or `srun mega run ...` (one task per worker)"
            )
        layout(1, tp, pp)
        return set_current(ParallelState())
    world, rank, local = (int(os.environ[k]) for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"))
    dp = layout(world, tp, pp)
    if not dist.is_initialized():
        backend = "nccl" if accelerator_type(accelerator) == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local)
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    # A new group does not inherit the default group's timeout (gloo's default is 30
    # minutes): set it on each, so DDP's gradient all-reduce on the data-parallel group
    # times out too.
    group_timeout = datetime.timedelta(seconds=timeout_s)
    from mega.runtime.orphan import watch_launcher
    from mega.runtime.watchdog import start_watchdog

    watch_launcher()  # a launcher killed outright cannot forward a signal: its workers stop on their own
    start_watchdog(rank, world, timeout_s)  # ends the run, naming the rank, when one hangs anywhere
    tp_rank, dp_rank, pp_rank = rank % tp, (rank // tp) % dp, rank // (tp * dp)
    groups, pp_ranks = {}, ()
    # Every rank creates every group, in the same order (torch.distributed requires it).
    for kind, members in rank_groups(tp, dp, pp):
        g = dist.new_group(members, timeout=group_timeout)
        if rank in members:
            groups[kind] = g
            if kind == "pp":
                pp_ranks = tuple(members)
    return set_current(ParallelState(
        world_size=world, rank=rank, local_rank=local, dp_size=dp, dp_rank=dp_rank, tp_size=tp, tp_rank=tp_rank,
        pp_size=pp, pp_rank=pp_rank, tp_group=groups["tp"], dp_group=groups["dp"], pp_group=groups["pp"], pp_ranks=pp_ranks,
        embedding_group=groups.get("embedding"),
    ))


def shutdown_parallel() -> None:
    from mega.runtime.orphan import stop_watching
    from mega.runtime.watchdog import stop_watchdog

    stop_watchdog()
    stop_watching()
    set_current(ParallelState())
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


ACCELERATORS = ("cpu", "gpu", "cuda", "auto")


def accelerator_type(accelerator: str) -> str:
    """`trainer.accelerator` as a torch device type: "cuda" or "cpu"."""
    if accelerator == "cpu":
        return "cpu"
    if accelerator in ("gpu", "cuda"):
        if not torch.cuda.is_available():
            raise ConfigError("trainer.accelerator: \"gpu\" asked for, but torch sees no CUDA device")
        return "cuda"
    if accelerator == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    raise ConfigError(f"trainer.accelerator: expected \"cpu\", \"gpu\" or \"auto\", got {accelerator!r}")


def check_devices(accelerator: str, devices: int) -> str:
    """The device type `trainer.devices` workers of this machine will use; a ConfigError,
    before any worker starts, when they would be CUDA workers and the machine has fewer
    GPUs than workers (each worker takes the GPU of its local rank)."""
    kind = accelerator_type(accelerator)
    if kind == "cuda":
        found = torch.cuda.device_count()
        if devices > found:
            raise ConfigError(
                f"trainer.devices={devices}: this machine has {found} CUDA device{'s' if found != 1 else ''}"
                f" (trainer.accelerator={accelerator!r}); use trainer.devices<={found}, or trainer.accelerator=\"cpu\""
                f" to run {devices} processes on the CPU (gloo)")
    return kind


def pick_device(accelerator: str, local_rank: int = 0) -> torch.device:
    if accelerator_type(accelerator) == "cuda":
        return torch.device("cuda", local_rank)
    return torch.device("cpu")
