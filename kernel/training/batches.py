"""Global batches -> this rank's micro-batches, by sample position.

Sample positions are global and sequential (Megatron's pretraining sampler): step s uses
positions [s * global_batch_size, (s + 1) * global_batch_size) of the train dataset. Each
data-parallel rank takes a contiguous slice of them and cuts it into micro-batches. The
position is therefore all a resumed run needs to continue the same data.

`BatchLoader` reads the global batches of the steps ahead in a background thread (into
pinned memory when training on CUDA, copied to the device without blocking), so a step
whose data is slow to read does not wait for it; the samples are the same, by position.
"""
from __future__ import annotations

import queue
import threading
import time
from typing import Dict, List, Optional, Tuple

import torch

from mega.runtime.collate import collate

from mega.errors import ConfigError


def batch_geometry(micro_batch_size: int, global_batch_size, accumulate: int, dp_size: int) -> tuple[int, int]:
    """(global batch size, micro-batches per step on each rank), checked for consistency."""
    if micro_batch_size < 1:
        raise ConfigError(f"model.micro_batch_size: must be at least 1, got {micro_batch_size}")
    if accumulate < 1:
        raise ConfigError(f"trainer.accumulate_grad_batches: must be at least 1, got {accumulate}")
    per_step = micro_batch_size * dp_size
    if global_batch_size is None:
        return per_step * accumulate, accumulate
    if global_batch_size < 1 or global_batch_size % per_step:
        raise ConfigError(
            f"model.global_batch_size={global_batch_size}: must be a positive multiple of micro_batch_size x data-parallel"
            f" size = {micro_batch_size} x {dp_size}"
        )
    n_micro = global_batch_size // per_step
    if accumulate not in (1, n_micro):
        raise ConfigError(
            f"trainer.accumulate_grad_batches={accumulate} disagrees with model.global_batch_size={global_batch_size}"
            f" / (micro_batch_size {micro_batch_size} x data-parallel {dp_size}) = {n_micro}; set one of them"
        )
    return global_batch_size, n_micro


def micro_batch_positions(step: int, global_batch_size: int, micro_batch_size: int, dp_rank: int, dp_size: int) -> List[range]:
    per_rank = global_batch_size // dp_size
    first = step * global_batch_size + dp_rank * per_rank
    return [range(first + i, first + i + micro_batch_size) for i in range(0, per_rank, micro_batch_size)]


def load_micro_batches(dataset, positions: List[range], device: torch.device) -> List[Dict[str, torch.Tensor]]:
    return [{k: v.to(device, non_blocking=True) for k, v in collate([dataset[i] for i in r]).items()} for r in positions]


def read_micro_batches(dataset, positions: List[range], pin: bool = False) -> List[Dict[str, torch.Tensor]]:
    """This rank's micro-batches on the host (pinned for asynchronous copies when `pin`)."""
    batches = [collate([dataset[i] for i in r]) for r in positions]
    return [{k: v.pin_memory() for k, v in b.items()} for b in batches] if pin else batches


class BatchLoader:
    """This rank's micro-batches, step after step, read up to `prefetch` global batches
    ahead by a background thread (0: read when asked, in the caller's thread).

    `get(step)` returns (micro-batches on the device, seconds the caller waited for them).
    Steps are asked in order from where the loader started; asking another step restarts
    the reader there. A reading error is raised by the `get` of the step it belongs to.
    The thread reads nothing at or past `end_step` and stops on `close()`."""

    def __init__(self, dataset, global_batch_size: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                 device: torch.device, prefetch: int = 1, end_step: Optional[int] = None):
        self.dataset, self.device, self.prefetch, self.end_step = dataset, device, max(0, int(prefetch)), end_step
        self.geometry = (global_batch_size, micro_batch_size, dp_rank, dp_size)
        self.pin = device.type == "cuda" and torch.cuda.is_available()
        self._thread: Optional[threading.Thread] = None
        self._queue: Optional[queue.Queue] = None
        self._stop = threading.Event()
        self._next = None

    def _read(self, step: int) -> List[Dict[str, torch.Tensor]]:
        return read_micro_batches(self.dataset, micro_batch_positions(step, *self.geometry), self.pin)

    def _reader(self, first: int, out: queue.Queue, stop: threading.Event) -> None:
        step = first
        while not stop.is_set() and (self.end_step is None or step < self.end_step):
            try:
                item = (step, self._read(step))
            except BaseException as exc:  # handed to the step that needed it
                item = (step, exc)
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item[1], BaseException):
                return
            step += 1

    def _start(self, step: int) -> None:
        self.close()
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=self.prefetch)
        self._thread = threading.Thread(target=self._reader, args=(step, self._queue, self._stop),
                                        name="mega-batch-reader", daemon=True)
        self._thread.start()
        self._next = step

    def ready(self, step: int) -> bool:
        """Whether `step`'s batch has been read and waits in the queue (for tests and logs)."""
        return self.prefetch > 0 and self._next == step and self._queue is not None and not self._queue.empty()

    def get(self, step: int) -> Tuple[List[Dict[str, torch.Tensor]], float]:
        t0 = time.perf_counter()
        if self.prefetch == 0:
            host = self._read(step)
        else:
            if self._thread is None or self._next != step:
                self._start(step)
            got, host = self._queue.get()
            if got != step:  # cannot happen: steps are queued in order
                raise RuntimeError(f"batch reader returned step {got} for step {step}")
            self._next = step + 1
            if isinstance(host, BaseException):
                self._thread = None
                raise host
        batches = [{k: v.to(self.device, non_blocking=True) for k, v in b.items()} for b in host]
        return batches, time.perf_counter() - t0

    def close(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=10)
            self._thread = None
        self._next = None
