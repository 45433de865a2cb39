"""`srun mega run ...`: each SLURM task is one worker.

srun starts the same command once per task and tells each task who it is through its
environment: SLURM_PROCID (global rank), SLURM_NTASKS (world size), SLURM_LOCALID (rank on
its node) and the step's node list. A task that finds itself started so joins the process
group as a launched worker would: its RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT are derived from those variables (`adopt_srun_task`), so nothing is launched
on top of it (one worker per task, never N per task).

The conventions are PyTorch Lightning's (NeMo runs on them), so an `sbatch` script written
for either works unchanged:

* a task of `srun` is recognised by SLURM_NTASKS and SLURM_PROCID together with srun's own
  step variable SLURM_STEP_ID (the batch script itself has SLURM_NTASKS too, but is no
  task), unless the job is named "bash" or "interactive" (an interactive allocation where
  processes are started by hand);
* MASTER_ADDR is the first host of the step's node list (SLURM_STEP_NODELIST, else
  SLURM_NODELIST, else SLURM_JOB_NODELIST), expanded from SLURM's compressed form
  (`node[01-03,07]`) by `expand_hostlist`, without calling scontrol;
* MASTER_PORT is 15000 + the last four digits of SLURM_JOB_ID, so every task of the job
  computes the same port without talking to the others;
* MASTER_ADDR / MASTER_PORT already in the environment win (a cluster that sets them).

Settings that contradict the allocation are refused before any process group is joined:
trainer.devices x trainer.num_nodes must equal SLURM_NTASKS (one worker per task), and
trainer.num_nodes the step's node count.
"""
from __future__ import annotations

import os
import re
from typing import List, Mapping, Optional

import attrs

from mega.errors import ConfigError

INTERACTIVE_JOB_NAMES = ("bash", "interactive")  # Lightning's escape hatch: not an srun task
NODELIST_VARIABLES = ("SLURM_STEP_NODELIST", "SLURM_NODELIST", "SLURM_JOB_NODELIST")
NUM_NODES_VARIABLES = ("SLURM_STEP_NUM_NODES", "SLURM_NNODES", "SLURM_JOB_NUM_NODES")
PORT_BASE = 15000  # + the last four digits of SLURM_JOB_ID (Lightning's rule)
DEFAULT_PORT = 12910  # without a job id (Lightning's default)
_ADOPTED = False  # this process set RANK & co. from its srun task


@attrs.frozen
class SrunTask:
    """Who this process is among the tasks of an srun step."""

    rank: int
    world_size: int
    local_rank: int
    num_nodes: Optional[int]  # None when SLURM did not say
    hosts: tuple  # the step's nodes, expanded
    job_id: Optional[str]

    @property
    def master_addr(self) -> str:
        return self.hosts[0] if self.hosts else "127.0.0.1"

    @property
    def master_port(self) -> int:
        digits = re.sub(r"\D", "", self.job_id or "")
        return PORT_BASE + int(digits[-4:]) if digits else DEFAULT_PORT


def _expand_ranges(body: str, name: str) -> List[str]:
    """`01-03,07` -> ["01", "02", "03", "07"] (zero padding kept, as SLURM writes it)."""
    out = []
    for part in body.split(","):
        lo, sep, hi = part.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ConfigError(f"{name}: cannot read the range [{body}] of a SLURM node list")
        if not sep:
            out.append(lo)
            continue
        if int(hi) < int(lo):
            raise ConfigError(f"{name}: the range {part} of a SLURM node list runs backwards")
        width = len(lo)
        out.extend(str(i).zfill(width) for i in range(int(lo), int(hi) + 1))
    return out


def _split_top_level(spec: str) -> List[str]:
    """Split a node list at the commas (and spaces) outside brackets."""
    parts, depth, current = [], 0, ""
    for ch in spec:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch in ", " and depth == 0:
            if current:
                parts.append(current)
            current = ""
        else:
            current += ch
    if current:
        parts.append(current)
    return parts


def expand_hostlist(spec: str, name: str = "SLURM_JOB_NODELIST") -> List[str]:
    """The host names of a SLURM node list, in order: `node[01-03,07]` -> node01, node02,
    node03, node07; `a[1-2]-ib,b3`; several bracket groups (`rack[1-2]-n[1-2]`) expand to
    every combination, the last group varying fastest, as SLURM's hostlist does."""
    hosts: List[str] = []
    for word in _split_top_level(spec.strip()):
        if word.count("[") != word.count("]"):
            raise ConfigError(f"{name}={spec!r}: unbalanced brackets in a SLURM node list")
        names = [""]
        for literal, body in re.findall(r"([^\[\]]*)(?:\[([^\[\]]*)\])?", word):
            names = [n + literal for n in names]
            if body:
                names = [n + x for n in names for x in _expand_ranges(body, name)]
        hosts.extend(n for n in names if n)
    return hosts


def _int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise ConfigError(f"{key}={env[key]!r}: not an integer (set by srun?)") from None


def srun_task(env: Optional[Mapping[str, str]] = None) -> Optional[SrunTask]:
    """This process as an srun task, or None when srun did not start it."""
    env = os.environ if env is None else env
    if not all(k in env for k in ("SLURM_NTASKS", "SLURM_PROCID", "SLURM_STEP_ID")):
        return None
    if env.get("SLURM_JOB_NAME") in INTERACTIVE_JOB_NAMES:
        return None
    nodelist = next(((k, env[k]) for k in NODELIST_VARIABLES if env.get(k)), None)
    hosts = tuple(expand_hostlist(nodelist[1], nodelist[0])) if nodelist else ()
    num_nodes = next((_int(env, k) for k in NUM_NODES_VARIABLES if env.get(k)), None)
    return SrunTask(rank=_int(env, "SLURM_PROCID"), world_size=_int(env, "SLURM_NTASKS"),
                    local_rank=_int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0,
                    num_nodes=num_nodes, hosts=hosts, job_id=env.get("SLURM_JOB_ID"))


def check_task(task: SrunTask, devices: int, num_nodes: int) -> None:
    """A ConfigError naming the keys and the variables when the config contradicts the
    allocation srun started this task in."""
    if devices * num_nodes != task.world_size:
        raise ConfigError(
            f"trainer.devices={devices} x trainer.num_nodes={num_nodes} = {devices * num_nodes} workers, but srun started"
            f" SLURM_NTASKS={task.world_size} tasks (each task is one worker): set trainer.devices to the tasks per node"
            " (#SBATCH --ntasks-per-node) and trainer.num_nodes to the nodes (#SBATCH --nodes)")
    if task.num_nodes is not None and task.num_nodes != num_nodes:
        raise ConfigError(
            f"trainer.devices={devices} x trainer.num_nodes={num_nodes}, but this srun step runs on"
            f" SLURM_NNODES={task.num_nodes} nodes: set trainer.num_nodes={task.num_nodes} and trainer.devices to the tasks"
            " per node")
    if not 0 <= task.local_rank < devices:
        raise ConfigError(
            f"SLURM_LOCALID={task.local_rank}: this node runs more tasks than trainer.devices={devices}; give every"
            " node the same number of tasks (#SBATCH --ntasks-per-node) and set trainer.devices to it")
    if not 0 <= task.rank < task.world_size:
        raise ConfigError(f"SLURM_PROCID={task.rank} is outside SLURM_NTASKS={task.world_size}")


def adopt_srun_task(devices: int, num_nodes: int) -> bool:
    """Under `srun` with more than one task: check the config against the allocation and
    set RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT from
    the SLURM variables (what torch.distributed's env:// rendezvous reads). True when this
    process is such a task. Idempotent; a process launched otherwise (torchrun inside the
    job: RANK already set) is left alone."""
    global _ADOPTED
    if "RANK" in os.environ:  # adopted already, or started by a launcher inside the task (torchrun): its variables rule
        return _ADOPTED
    task = srun_task()
    if task is None or task.world_size < 2:
        return False  # one task: `mega run` launches trainer.devices local workers itself, as without SLURM
    check_task(task, devices, num_nodes)
    os.environ.update({"RANK": str(task.rank), "WORLD_SIZE": str(task.world_size), "LOCAL_RANK": str(task.local_rank),
                       "LOCAL_WORLD_SIZE": str(devices)})
    os.environ.setdefault("MASTER_ADDR", task.master_addr)
    os.environ.setdefault("MASTER_PORT", str(task.master_port))
    _ADOPTED = True
    return True


def process_rank() -> int:
    """This process's global rank as far as the environment says, before any group is
    joined: RANK (torchrun, `mega run`'s workers), else an srun task's SLURM_PROCID."""
    if "RANK" in os.environ:
        try:
            return int(os.environ["RANK"])
        except ValueError:
            return 0
    try:
        task = srun_task()
    except ConfigError:
        return 0
    return task.rank if task is not None else 0
