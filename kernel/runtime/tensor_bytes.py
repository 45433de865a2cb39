"""Bytes of the tensors a block of code creates, alive now and at their peak, counted on any
device, CPU included (whose allocator keeps no statistics): every storage an operator
returns is counted once, from its creation until Python frees it.

`mega plan`'s activation bytes are checked against it (tests/kernel/test_plan.py): what the
tensors of a real forward leave alive for the backward, per recomputation mode and with
sequence parallelism, and the peak the backward's recomputation reaches.
benchmarks/bench_memory.py reports it per rank next to the process's peak RSS.

Storages that existed before the block (parameters, the batch) are not counted; a storage
an operator resizes is counted at its new size.
"""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary


class TensorBytes(TorchDispatchMode):
    """`with TensorBytes() as counted:` ...; then `counted.live` (bytes of the storages made
    inside and still alive) and `counted.peak` (the most alive at once); `reset_peak()`
    starts a new peak from what is alive now."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._sizes = WeakIdKeyDictionary()  # storage -> bytes counted for it
        self._refs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor) and not t.is_meta}
        out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and not t.is_meta:
                self._count(t.untyped_storage(), inputs)
        self.peak = max(self.peak, self.live)
        return out

    def _count(self, storage, inputs) -> None:
        size = storage.nbytes()
        before = self._sizes.get(storage)
        if before is None:
            if storage.data_ptr() in inputs and size:  # a view of an input, or written in place: not made here
                return
            box = [size]
            self._refs.append(weakref.ref(storage, lambda _, box=box: self._free(box)))
            self._sizes[storage] = box
            self.live += size
        elif before[0] != size:  # resized by an out= operator
            self.live += size - before[0]
            before[0] = size

    def _free(self, box) -> None:
        self.live -= box[0]

    def reset_peak(self) -> None:
        self.peak = self.live
