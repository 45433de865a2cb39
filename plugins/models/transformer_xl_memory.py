"""Transformer-XL's training memory as one device buffer indexed by stream, so the step
never asks the host which memory to use and never changes a shape (what a CUDA graph
needs: `torch.compile(mode="reduce-overhead")` replays the step on fixed storage).

The buffer holds `[n_layer, mem_len, slots, d_model]`: every stream's last mem_len layer
inputs, right-aligned, plus `valid[slots]`, how many of those positions hold text (0 before
a stream's first segment; the reference's memory is then empty). A micro-batch gathers its
samples' columns by `batch["stream"]` on the device, attends over all mem_len positions with
the first `mem_len - valid` masked (a masked key adds exact zeros: the same attention as over
the shorter memory), and scatters the new memory back in place.

Slots: the streams one data-parallel replica reads. `lm_ordered` gives rank r of dp the
streams r*S/dp .. (r+1)*S/dp - 1 (S: model.data.streams, by default the global batch
size), so `stream % (S/dp)` numbers them 0.. without reading the rank. A batch without
stream ids (a data source that does not declare them) uses one slot per row of the
micro-batch, as the memory keyed by "no stream" did before.

Checkpoints written before this layout carried `mems.{first stream of the micro-batch}`
tensors `[n_layer, mlen, bsz, d]`; `load` converts them (`from_slot_tensors`).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch


class StreamMemory:
    """The memory of every stream one replica trains on (see the module docstring)."""

    def __init__(self, n_layer: int, mem_len: int, d_model: int, slots: int):
        self.shape = (n_layer, mem_len, slots, d_model)
        self.mems: Optional[torch.Tensor] = None  # allocated by the first write (the activations' dtype and device)
        self.valid: Optional[torch.Tensor] = None

    @property
    def slots(self) -> int:
        return self.shape[2]

    def index(self, batch: Dict[str, torch.Tensor], bsz: int, device) -> torch.Tensor:
        """[bsz] slot of each row of `batch` (a device tensor: nothing is read)."""
        if "stream" in batch:
            return batch["stream"].reshape(-1).to(device=device, dtype=torch.long) % self.slots
        return torch.arange(bsz, device=device) % self.slots

    def allocate(self, dtype: torch.dtype, device) -> None:
        """Zeros, once (the model allocates its training memory when it is built, so that
        a compiled step finds it there from the first call; the model moves it along)."""
        if self.mems is None:
            self.mems = torch.zeros(self.shape, dtype=dtype, device=device)
            self.valid = torch.zeros(self.slots, dtype=torch.long, device=device)

    def read(self, idx: torch.Tensor, dtype: torch.dtype, device) -> Tuple[torch.Tensor, torch.Tensor]:
        """(memory [n_layer, mem_len, bsz, d] in `dtype`, valid positions [bsz]) of rows `idx`:
        copies, so writing the buffer afterwards leaves what this step's backward keeps alone.
        The buffer keeps the dtype it was built with (fp32 under model.megatron_amp_O2, whose
        bf16 weights replace the fp32 ones after the model is built: it holds bf16 values exactly)."""
        self.allocate(dtype, device)
        return self.mems.index_select(2, idx).to(dtype), self.valid.index_select(0, idx)

    def write(self, idx: torch.Tensor, mems: torch.Tensor, valid: torch.Tensor) -> None:
        """Store rows `idx` in place (the same storage every step)."""
        with torch.no_grad():
            self.mems.index_copy_(2, idx, mems.to(self.mems.dtype))
            self.valid.index_copy_(0, idx, valid)

    def reset(self) -> None:
        """Every stream starts afresh (the storage is kept)."""
        if self.valid is not None:
            self.valid.zero_()
            self.mems.zero_()

    def state(self) -> Dict[str, torch.Tensor]:
        if self.mems is None:
            return {}
        return {"mems": self.mems, "mems_valid": self.valid}

    def load(self, state: Dict[str, torch.Tensor]) -> None:
        if "mems" in state:
            mems, valid = state["mems"], state["mems_valid"]
            if tuple(mems.shape) != self.shape:
                from mega.errors import CheckpointError

                raise CheckpointError(f"carried_state.mems: shape {tuple(mems.shape)}, this model's memory is"
                                      f" {self.shape} (n_layer, mem_len, streams per replica, d_model)")
            self.mems, self.valid = mems.clone(), valid.clone().long()
            return
        old = {int(k.split(".", 1)[1]): v for k, v in state.items() if k.startswith("mems.")}
        if old:
            self.mems, self.valid = from_slot_tensors(old, self.shape)
        else:
            self.mems = self.valid = None


def from_slot_tensors(old: Dict[int, torch.Tensor], shape) -> Tuple[torch.Tensor, torch.Tensor]:
    """The buffer and valid lengths of a checkpoint that kept one `[n_layer, mlen, bsz, d]`
    tensor per micro-batch, keyed by the stream of its first row (-1: no stream ids, rows
    0..bsz-1): row b belongs to stream key + b, its mlen positions are right-aligned."""
    n_layer, mem_len, slots, d = shape
    some = next(iter(old.values()))
    mems = torch.zeros(shape, dtype=some.dtype, device=some.device)
    valid = torch.zeros(slots, dtype=torch.long, device=some.device)
    for first, m in old.items():
        mlen = min(m.size(1), mem_len)
        cols = (torch.arange(m.size(2), device=some.device) + max(first, 0)) % slots
        if mlen:
            mems[:, mem_len - mlen:].index_copy_(2, cols, m[:, m.size(1) - mlen:].to(mems.dtype))
        valid.index_fill_(0, cols, mlen)
    return mems, valid
