"""Starting local worker processes through PyTorch's elastic launcher.

`mega run exp.toml trainer.devices=N` (with no launcher around it) re-runs the same
command line in N workers via `torch.distributed.launcher` (what `torchrun` uses), with a
local rendezvous. Across machines, start the same command under
`torchrun --nnodes=K --nproc-per-node=N -m mega run exp.toml ...`; a process that finds
itself launched (RANK / WORLD_SIZE / LOCAL_RANK in its environment) joins the group
instead of launching. A worker that fails ends the run: the launcher stops the others and
we report each failed rank with its error. SIGTERM, SIGINT or SIGUSR1 (SLURM's warning
before a job's time limit) to the launching process is forwarded to the workers (which
finish their step and save a checkpoint); the launcher then exits 128 + the signal, like
one process. Under `srun` with one task per worker nothing is launched
(`mega.runtime.slurm`).
"""
from __future__ import annotations

import os
import signal
import sys
import uuid
from typing import List

from mega.errors import MegaError


class WorkerFailed(MegaError):
    """One or more workers failed; the message names each rank and its error."""

    exit_code = 1


class LauncherStopped(SystemExit):
    """SIGTERM, SIGINT or SIGUSR1 reached the launching process; the workers got it too and
    stopped after saving a checkpoint. Exit status 128 + the signal (143, 130, 138)."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signum = signum

    def __str__(self) -> str:
        return (f"{signal.Signals(self.signum).name}: the workers stopped after their current step and saved a checkpoint;"
                " re-run the same command to resume")


def launched() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def launch_local_workers(nproc: int, argv: List[str]) -> None:
    """Run `python -m mega <argv>` in `nproc` workers on this machine; raise WorkerFailed
    naming the failed ranks."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # Split the cores between workers unless the user chose (torchrun does the same).
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"mega-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.2,
        start_method="spawn",
    )
    forwarded = [s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGUSR1", None)) if s is not None]
    handlers = {s: signal.getsignal(s) for s in forwarded}
    if hasattr(signal, "SIGUSR1"):  # the elastic agent forwards the signals it handles; it does not handle this one
        signal.signal(signal.SIGUSR1, _forward_to_workers)
    try:
        elastic_launch(config, sys.executable)("-m", "mega", *argv)
    except ChildFailedError as err:
        lines = []
        for rank, failure in sorted(err.failures.items()):
            message = failure.message
            if isinstance(message, dict):  # the error file's record: {"message": ..., "extraInfo": ...}
                message = message.get("message", "")
            message = str(message or "").strip().splitlines()
            lines.append(f"worker rank {rank} exited with status {failure.exitcode}: {message[0] if message else 'no message'}")
        raise WorkerFailed("; ".join(lines)) from None
    except SignalException as exc:  # the elastic agent forwarded it and waited for the workers
        raise LauncherStopped(int(exc.sigval)) from None
    finally:  # the elastic agent installs its own handlers and leaves them; put ours back
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


def _forward_to_workers(signum, frame) -> None:
    """Stop the elastic agent as its own SIGTERM handler does: it then sends the signal to
    every worker and waits for them to exit (each saves a checkpoint first)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException

    raise SignalException(f"Process {os.getpid()} got signal: {signum}", sigval=signal.Signals(signum))


def record_worker_error(exc: BaseException) -> None:
    """Write `exc` where the elastic agent reads a failed worker's error (so the launching
    process can name it); a no-op outside a launched worker."""
    if "TORCHELASTIC_ERROR_FILE" not in os.environ:
        return
    from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

    from mega.runtime.watchdog import WorkerHung, explain_timeout

    hung = explain_timeout(exc)  # a collective timed out: name the rank that hung, not the timeout
    if hung:
        print(f"mega: error: {hung}", file=sys.stderr, flush=True)
        exc = WorkerHung(hung)

    try:
        ErrorHandler().record_exception(exc)
    except Exception:  # never mask the original error
        pass
