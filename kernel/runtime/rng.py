"""Every random number generator of a run: seeding, capturing and restoring them (so a
resumed run continues the exact random stream, dropout masks included, of an
uninterrupted one), and the model-parallel RNG tracker whose states are part of that.

The tracker is Megatron's CudaRNGStatesTracker, on any device. Dropout on activations that
every tensor-parallel rank holds identically (after a reduce) must draw the same mask on
each rank: it uses the default generator, seeded alike on every rank. Dropout inside a
tensor-parallel region (attention probabilities of this rank's heads) must differ between
ranks: it runs under `tracker.fork()`, which swaps in a generator seeded with
seed + 2718 + tp_rank. With one rank nothing is forked, so the single-process random
stream is untouched.

A fork is re-entrant: under sequence parallelism the whole transformer stack runs inside
one fork (each rank's tokens draw their own residual-dropout masks, Megatron's rule), and
the attention dropout's own fork inside it must keep drawing from the same stream rather
than restart it from the state saved at the outer fork's entry. `snapshot()` and
`restore()` let activation recomputation (mega.runtime.recompute) replay a region with the
tracker exactly as it was in the forward.
"""
from __future__ import annotations

import contextlib
import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def rng_state() -> dict:
    """All generator states as tensors and plain values (safe for weights_only loading)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    state["rng_tracker_states"] = get_rng_tracker().state_dict()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_tuplify(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "rng_tracker_states" in state:
        get_rng_tracker().load_state_dict(state["rng_tracker_states"])


def _tuplify(x):
    return tuple(_tuplify(i) for i in x) if isinstance(x, (list, tuple)) else x


# --- the model-parallel RNG tracker ---------------------------------------------------------

MODEL_PARALLEL = "model-parallel-rng"


class RNGTracker:
    def __init__(self):
        self.states = {}
        self.device_type = "cpu"
        self.forked = []  # names of the forks entered and not yet left, innermost last

    def _get(self):
        return torch.cuda.get_rng_state() if self.device_type == "cuda" else torch.get_rng_state()

    def _set(self, state):
        (torch.cuda.set_rng_state if self.device_type == "cuda" else torch.set_rng_state)(state)

    def reset(self, seed: int, tp_rank: int, device_type: str) -> None:
        self.device_type = device_type
        self.states = {}
        self.forked = []
        saved = self._get()
        (torch.cuda.manual_seed if device_type == "cuda" else torch.manual_seed)(seed + 2718 + tp_rank)
        self.states[MODEL_PARALLEL] = self._get()
        self._set(saved)

    @contextlib.contextmanager
    def fork(self, name: str = MODEL_PARALLEL):
        """Draw from the `name` stream inside the block. Inside a fork of the same name it
        is a no-op: the generator already is that stream."""
        if name not in self.states:
            raise RuntimeError(f"RNG tracker has no state {name!r}; call reset() first")
        if name in self.forked:
            yield
            return
        saved = self._get()
        self._set(self.states[name])
        self.forked.append(name)
        try:
            yield
        finally:
            self.forked.pop()
            self.states[name] = self._get()
            self._set(saved)

    def snapshot(self) -> tuple:
        """The tracker as it is now (its states, the forks entered), for `restore`."""
        return dict(self.states), list(self.forked)  # states are replaced, never written in place

    @contextlib.contextmanager
    def restore(self, snap: tuple):
        """Run the block with the tracker as `snap` recorded it, then put back what it is
        now: a recomputed region draws the masks of its forward and leaves the streams where
        they were (Megatron's CheckpointFunction sets and restores the tracker's states)."""
        now = self.states, self.forked
        self.states, self.forked = dict(snap[0]), list(snap[1])
        try:
            yield
        finally:
            self.states, self.forked = now

    def state_dict(self) -> dict:
        return {"device_type": self.device_type, "states": dict(self.states)}

    def load_state_dict(self, state: dict) -> None:
        self.device_type = state["device_type"]
        self.states = dict(state["states"])


_TRACKER = RNGTracker()


def get_rng_tracker() -> RNGTracker:
    return _TRACKER
