"""A launched worker stops when its launcher dies.

`mega run ... trainer.devices=N` (and torchrun) start every worker as a child of the
launching process, which also hosts the rendezvous store. SIGTERM and SIGINT to the
launcher reach the workers (it forwards them); SIGKILL, an out-of-memory kill or a crash
of the launcher does not, and the workers trained on to the end, each heartbeat to the
dead store printing a C++ stack trace. A thread in each worker watches for the launcher
to go (the worker is re-parented: its parent PID changes) and then stops the worker as
SIGTERM would: after the step it is in, with a checkpoint, exit 143. Ranks that notice a
moment apart still stop at the same step (the loop agrees on the stop with an all-reduce
over the process group, which does not need the store).
"""
from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Optional

log = logging.getLogger("mega")

_PARENT: Optional[int] = None  # the launcher's PID, as seen when the watch started
_STOP: Optional[threading.Event] = None  # set to end the current watch


def launcher_gone() -> bool:
    """Whether the process that launched this worker has died (False when not watching)."""
    return _PARENT is not None and os.getppid() != _PARENT


def watch_launcher(interval_s: float = 0.5) -> None:
    """Watch this worker's launcher from a daemon thread (idempotent); SIGTERM this process
    when it is gone. Only under torch's elastic agent (`mega run`'s launcher, torchrun),
    whose workers are its children: a worker started some other way may outlive its
    parent by design."""
    global _PARENT, _STOP
    if _PARENT is not None or "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    _PARENT, _STOP = os.getppid(), threading.Event()
    threading.Thread(target=_watch, args=(_PARENT, _STOP, interval_s), name="mega-launcher-watch", daemon=True).start()


def _watch(parent: int, stop: threading.Event, interval_s: float) -> None:
    while not stop.wait(interval_s):
        if os.getppid() != parent:
            if os.environ.get("LOCAL_RANK", "0") == "0":  # one line per machine
                log.warning("the launching process (PID %d) is gone: its workers stop after this step and save a"
                            " checkpoint", parent)
            os.kill(os.getpid(), signal.SIGTERM)
            return


def stop_watching() -> None:
    global _PARENT, _STOP
    if _STOP is not None:
        _STOP.set()
    _PARENT, _STOP = None, None
