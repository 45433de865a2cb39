"""Count the places where code makes the host wait for the device, on any device.

On a GPU a training step should queue kernels and return: every `.item()`, `float(t)`,
`bool(t)` (a Python `if` on a tensor), `.tolist()`, `.cpu()`, `.numpy()` or operator whose
output size depends on the data (`nonzero`, a boolean-mask index, `masked_select`,
`unique`) stops the host until the device has finished all queued work. Those stalls are
invisible on the CPU, where the host *is* the device, and they keep a step from being
captured as a CUDA graph. `count_host_syncs()` records them anyway, so a CPU test can
hold a step to "no syncs":

    from mega.testing import count_host_syncs

    with count_host_syncs() as syncs:
        train_step(run)
    assert syncs.count == 0, syncs.summary()

It watches two levels. A `TorchDispatchMode` sees the aten operators every such call
ends in (`_local_scalar_dense` for item/float/int/bool, the data-dependent operators, and
copies from a device to the CPU). The Python-level reads that never reach the dispatcher
on a CPU tensor (`tolist`, `numpy`, `cpu`, `__array__`) are wrapped for the length of the
block. Each event keeps the first frame outside torch and this module, so a failing test
names the line to fix.

On the CPU every tensor counts: a step is held to keeping its host-side numbers (the
learning rate, timings) as Python numbers, not CPU tensors, which is also what keeps them
free on a GPU. `device` narrows the count to tensors on that device (e.g. "cuda" on a GPU
run, where host tensors are free to read).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
import traceback
from collections import Counter
from typing import Iterator, List, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# aten operators that read a device value on the host, or whose output shape depends on data.
_SCALAR_READS = {"_local_scalar_dense", "item", "equal", "is_nonzero"}
_DATA_DEPENDENT = {"nonzero", "masked_select", "_unique", "_unique2", "unique_dim", "unique_consecutive",
                   "unique_dim_consecutive", "bincount", "histc"}
_PYTHON_READS = ("tolist", "numpy", "cpu", "__array__")

_TORCH_DIR = os.path.dirname(torch.__file__)
_THIS_FILE = os.path.abspath(__file__)


@dataclasses.dataclass(frozen=True)
class HostSync:
    """One place the host waits: the operator (`aten._local_scalar_dense`, `Tensor.tolist`,
    ...) and the first caller outside torch (`path:line in function`)."""

    op: str
    where: str

    def __str__(self) -> str:
        return f"{self.op} at {self.where}"


class HostSyncs:
    """The syncs recorded in a `count_host_syncs()` block, in order."""

    def __init__(self):
        self.events: List[HostSync] = []

    @property
    def count(self) -> int:
        return len(self.events)

    def __len__(self) -> int:
        return len(self.events)

    def by_op(self) -> Counter:
        return Counter(e.op for e in self.events)

    def summary(self) -> str:
        """One line per distinct (operator, place), with how often: what a failing test prints."""
        if not self.events:
            return "no host syncs"
        counts = Counter(self.events)
        return "\n".join(f"{n} x {e}" for e, n in counts.most_common())


def _caller() -> str:
    for frame in reversed(traceback.extract_stack()):
        path = os.path.abspath(frame.filename)
        if path == _THIS_FILE or path.startswith(_TORCH_DIR):
            continue
        return f"{frame.filename}:{frame.lineno} in {frame.name}"
    return "<unknown>"


def _tensors(tree) -> List[torch.Tensor]:
    from torch.utils._pytree import tree_leaves

    return [t for t in tree_leaves(tree) if isinstance(t, torch.Tensor)]


def _bool_index(args) -> bool:
    """An index list holding a boolean mask: its result's size is the mask's count."""
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())


class _SyncMode(TorchDispatchMode):
    def __init__(self, record, on_device):
        super().__init__()
        self._record, self._on_device = record, on_device

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name.split("::", 1)[-1]
        out = func(*args, **kwargs)
        inputs = _tensors((args, kwargs))
        if name in _SCALAR_READS or name in _DATA_DEPENDENT:
            if any(self._on_device(t) for t in inputs):
                self._record(f"aten.{name}")
        elif name in ("index", "index_put", "index_put_", "_index_put_impl_") and _bool_index(args):
            if any(self._on_device(t) for t in inputs):
                self._record(f"aten.{name} with a boolean mask")
        elif name in ("_to_copy", "copy_", "to"):  # a copy from the device to the host
            dst = _tensors(out)
            if dst and dst[0].device.type == "cpu" and any(t.device.type != "cpu" and self._on_device(t) for t in inputs):
                self._record(f"aten.{name} to cpu")
        return out


@contextlib.contextmanager
def count_host_syncs(device: Optional[str] = None) -> Iterator[HostSyncs]:
    """Record every host synchronisation in the block (this thread only); yields a
    `HostSyncs`. `device`: count only reads of tensors on that device type ("cuda");
    None counts every tensor, which is what a CPU test wants."""
    syncs = HostSyncs()
    owner = threading.get_ident()
    busy = threading.local()  # a wrapped Python read calls aten underneath: count it once

    def on_device(t: torch.Tensor) -> bool:
        return device is None or t.device.type == torch.device(device).type

    def record(op: str) -> None:
        if threading.get_ident() == owner and not getattr(busy, "on", False):
            syncs.events.append(HostSync(op, _caller()))

    saved = {name: torch.Tensor.__dict__.get(name) for name in _PYTHON_READS}

    def wrap(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            if on_device(self) and not getattr(busy, "on", False):
                record(f"Tensor.{name}")
            was = getattr(busy, "on", False)
            busy.on = True
            try:
                return original(self, *args, **kwargs)
            finally:
                busy.on = was
        return read

    for name in _PYTHON_READS:
        setattr(torch.Tensor, name, wrap(name))
    try:
        with _SyncMode(record, on_device):
            yield syncs
    finally:
        for name, original in saved.items():
            if original is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, original)
