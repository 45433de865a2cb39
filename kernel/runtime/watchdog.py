"""A watchdog that ends a distributed run when a rank hangs, naming the rank.

A collective's own timeout does not cover every wait (a gradient all-reduce inside
backward, a group created without one, a rank stopped by SIGSTOP or a dead machine that
keeps its sockets open), so each launched rank also runs a thread that

- publishes a heartbeat (a counter it bumps every `interval` seconds, with the step the
  main thread last started) in the rendezvous store, and again as soon as the main thread
  starts a step, so the step a frozen rank is named at is the one it froze in, not the
  one of its last periodic heartbeat; and
- watches its own main thread: when it has not started a new step for
  `trainer.dist_timeout_s`, it reads the other ranks' heartbeats and, if some rank is the
  cause, ends this process (exit 1) with a message naming it:
  * a rank whose heartbeat counter has not moved for half the timeout is stopped or dead
    (the whole process is frozen, threads included);
  * a rank whose main thread is at an earlier step than this one is hung on the way to the
    collective this rank is waiting in.

The launcher then stops the other workers and reports the message. A rank that is merely
slow while every rank is at the same step is left to the collectives' own timeouts (set on
every group by `init_parallel`). Clocks are never compared across machines: staleness is
measured with this rank's own clock, by watching a peer's counter not change.
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from typing import Dict, Optional

from mega.errors import MegaError

log = logging.getLogger("mega")


class WorkerHung(MegaError):
    """Another rank stopped making progress for trainer.dist_timeout_s."""

    exit_code = 1


class Watchdog:
    def __init__(self, store, rank: int, world: int, timeout_s: float, interval_s: Optional[float] = None,
                 on_hang=None):
        self.store, self.rank, self.world, self.timeout_s = store, rank, world, float(timeout_s)
        self.interval_s = interval_s or min(5.0, max(0.2, self.timeout_s / 8))
        self.on_hang = on_hang or (lambda message: _end_process(message, self))
        self.step = 0  # the step the main thread is on (0: setting up)
        self._progress_at = time.monotonic()
        self._beats = 0
        self._stop = threading.Event()
        self._wake = threading.Event()  # set by beat(): publish the new step now
        self._seen: Dict[int, tuple] = {}  # peer -> (beats, step, done, first seen with these beats at)
        self._where: Dict[int, tuple] = {}  # peer -> (host, pid)
        self._thread = threading.Thread(target=self._run, name="mega-watchdog", daemon=True)

    def start(self) -> "Watchdog":
        self._publish()
        self._thread.start()
        return self

    def beat(self, step: int) -> None:
        """The main thread started `step` (called by the training loop); the watchdog thread
        publishes it right away (beats of fast steps coalesce into one write)."""
        self.step = step
        self._progress_at = time.monotonic()
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._publish(done=True)  # a rank that finished is not a hung one

    def _key(self, rank: int) -> str:
        return f"mega/watchdog/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{rank}"

    def _publish(self, done: bool = False) -> None:
        from mega.runtime.orphan import launcher_gone

        if launcher_gone():  # the store lived in the launcher: every write would fail with a C++ stack trace
            return
        self._beats += 1
        try:
            self.store.set(self._key(self.rank), json.dumps({"beats": self._beats, "step": self.step, "done": done,
                                                             "host": socket.gethostname(), "pid": os.getpid()}))
        except Exception:  # an unreachable store shows up when reading it
            pass

    def _read_peers(self, now: float) -> bool:
        """Update what we know of every other rank; False when the store did not answer."""
        try:
            keys = [self._key(r) for r in range(self.world) if r != self.rank]
            present = [k for k in keys if self.store.check([k])]
            values = self.store.multi_get(present) if present else []
        except Exception:
            return False
        for key, raw in zip(present, values):
            peer = int(key.rsplit("/", 1)[1])
            hb = json.loads(raw)
            old = self._seen.get(peer)
            since = old[3] if old is not None and old[0] == hb["beats"] else now
            self._seen[peer] = (hb["beats"], hb["step"], hb["done"], since)
            self._where[peer] = (hb.get("host"), hb.get("pid"))
        return True

    def _run(self) -> None:
        while True:
            woken = self._wake.wait(self.interval_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            self._publish()
            if woken:  # a new step: nothing is stuck
                continue
            now = time.monotonic()
            stuck_s = now - self._progress_at
            if stuck_s < self.timeout_s / 2:
                self._seen.clear()  # only watch the others while this rank is waiting
                continue
            reachable = self._read_peers(now)
            if stuck_s < self.timeout_s or self._stop.is_set():
                continue
            message = self._diagnose(now, reachable)
            if message:
                self.on_hang(message)
                return

    def explain(self) -> Optional[str]:
        """Which rank made this one's collective time out (None when no rank is to blame):
        read once more, with a shorter bar for a stopped heartbeat."""
        now = time.monotonic()
        if now - self._progress_at < self.timeout_s / 2:
            return None
        reachable = self._read_peers(now)
        return self._diagnose(now, reachable, frozen_after=3 * self.interval_s)

    def kill_frozen_local_peers(self) -> None:
        """SIGKILL the stopped ranks on this machine: the run is ending, and a stopped
        process would hold the launcher for its shutdown grace period."""
        now, host = time.monotonic(), socket.gethostname()
        for r, (_, _, done, since) in self._seen.items():
            peer_host, pid = self._where.get(r, (None, None))
            if not done and now - since >= 3 * self.interval_s and peer_host == host and pid:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except OSError:
                    pass

    def _diagnose(self, now: float, reachable: bool, frozen_after: Optional[float] = None) -> Optional[str]:
        t = f"trainer.dist_timeout_s={self.timeout_s:g}"
        frozen_after = self.timeout_s / 2 if frozen_after is None else frozen_after
        if not reachable:
            return f"rank {self.rank}: the rendezvous store stopped answering while this rank waited for {t} s (its host hung?)"
        silent = [r for r in range(self.world) if r != self.rank and r not in self._seen]
        frozen = [r for r, (_, _, done, since) in sorted(self._seen.items()) if not done and now - since >= frozen_after]
        behind = [r for r, (_, step, done, _) in sorted(self._seen.items()) if not done and step < self.step and r not in frozen]
        parts = []
        for r in frozen:
            parts.append(f"rank {r} hung: no heartbeat for at least {now - self._seen[r][3]:.3g} s (stopped or dead; last at step"
                         f" {self._seen[r][1]})")
        for r in behind:
            parts.append(f"rank {r} hung: still at step {self._seen[r][1]} while rank {self.rank} waited at step {self.step}"
                         f" for {t} s")
        if silent and self.step > 0:
            parts.append(f"rank(s) {', '.join(map(str, silent))} hung: never sent a heartbeat")
        return "; ".join(parts) or None


def _end_process(message: str, watchdog: Optional[Watchdog] = None) -> None:
    """End this worker now: its main thread is stuck in a collective that will not return."""
    from mega.runtime.launch import record_worker_error

    err = WorkerHung(message)
    record_worker_error(err)
    if watchdog is not None:
        watchdog.kill_frozen_local_peers()
    try:
        print(f"mega: error: {message}", file=sys.stderr, flush=True)
    finally:
        os._exit(WorkerHung.exit_code)


_CURRENT: Optional[Watchdog] = None
_LAST: Optional[Watchdog] = None  # kept after stopping, to explain an error raised on the way out


def current() -> Optional[Watchdog]:
    return _CURRENT


def explain_timeout(exc: BaseException) -> Optional[str]:
    """When `exc` is a collective's timeout caused by a hung rank, the watchdog's message
    naming it (and the stopped ranks on this machine are killed, as the run is ending)."""
    w = _CURRENT or _LAST
    text = str(exc).lower()
    if w is None or not isinstance(exc, Exception) or not ("timed out" in text or "timeout" in text):
        return None
    try:
        message = w.explain()
        if message:
            w.kill_frozen_local_peers()
        return message
    except Exception:
        return None


def beat(step: int) -> None:
    """Tell this rank's watchdog (if any) that the main thread started `step`."""
    if _CURRENT is not None:
        _CURRENT.beat(step)


def start_watchdog(rank: int, world: int, timeout_s: float) -> Optional[Watchdog]:
    """Start the watchdog of a launched rank, on its own connection to the rendezvous store
    (MASTER_ADDR:MASTER_PORT), so it never waits behind the main thread's store calls."""
    global _CURRENT, _LAST
    stop_watchdog()
    _LAST = None
    if world < 2 or os.environ.get("MEGA_WATCHDOG", "1") == "0":
        return None
    import torch.distributed as dist

    try:
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                              timeout=datetime.timedelta(seconds=max(5.0, min(30.0, timeout_s / 4))))
    except Exception as exc:  # a run without it still has the collectives' timeouts
        log.warning("rank %d: no watchdog (cannot reach the rendezvous store: %s)", rank, exc)
        return None
    _CURRENT = Watchdog(store, rank, world, timeout_s).start()
    return _CURRENT


def stop_watchdog() -> None:
    global _CURRENT, _LAST
    if _CURRENT is not None:
        _CURRENT.stop()
        _LAST, _CURRENT = _CURRENT, None
