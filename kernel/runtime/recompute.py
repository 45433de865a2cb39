"""Activation recomputation (Megatron's `recompute_granularity`, NeMo's
`activations_checkpoint_*`): a region's forward keeps only its inputs, and backward runs
the region again to get back what its own backward needs.

`checkpoint(fn, *args)` is `torch.utils.checkpoint.checkpoint`, non-reentrant, with the CPU
and device generators stashed and restored (`preserve_rng_state`) and, through its
`context_fn`, the rest of the context the forward ran in put back for the recomputation:

* the model-parallel RNG tracker (mega.runtime.rng): its states and the forks entered.
  Dropout inside a tensor-parallel region draws under `tracker.fork()`, which the torch
  checkpoint does not know; without this the recomputed attention dropout at TP > 1 draws
  other masks than the forward did (and advances the tracker a second time), so gradients
  differ while losses agree. With it, recomputed masks are the originals and gradients are
  bit for bit those of the run without recomputation (Megatron's CheckpointFunction does
  the same with `_get_all_rng_states` / `_set_all_rng_states`);
* whether the region ran inside the sequence-parallel region
  (mega.runtime.tensor_parallel.sequence_parallel), which backward runs outside of.

Why non-reentrant: backward runs the forward's own graph with recomputed saved tensors, so
the gradient arithmetic and its accumulation order are unchanged (the bitwise equality
above), it needs no input that requires grad, and it is what torch recommends.

`run_layers` applies Megatron's `full` granularity to a stack of layers: `uniform` checkpoints
chunks of `num_layers` layers, `block` the first `num_layers` layers one at a time.
Recomputation applies only to training forwards (module in training mode, grad enabled);
callers check `wanted(module)`.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional, Sequence

import torch
import torch.utils.checkpoint

from mega.runtime.rng import get_rng_tracker

_DEPTH = [0]  # checkpointed regions being run (their forward or their recomputation)


def in_checkpoint() -> bool:
    """Inside a checkpointed region: what its ops save is dropped and recomputed anyway,
    so layers need not save it more cleverly (the sequence-parallel linear's saving of
    its local input only)."""
    return _DEPTH[0] > 0


@contextlib.contextmanager
def _inside():
    _DEPTH[0] += 1
    try:
        yield
    finally:
        _DEPTH[0] -= 1


def _contexts():
    """torch.utils.checkpoint's `context_fn`: called at the region's forward; returns the
    context of that forward and the one its recomputation runs in."""
    from mega.runtime.tensor_parallel.sequence_parallel import sequence_parallel_region, sequence_parallel_state

    tracker = get_rng_tracker()
    snap, region = tracker.snapshot(), sequence_parallel_state()

    @contextlib.contextmanager
    def recompute():
        with tracker.restore(snap), sequence_parallel_region(region), _inside():
            yield

    return _inside(), recompute()


def checkpoint(fn: Callable, *args, **kwargs):
    """fn(*args, **kwargs), keeping only the inputs; recomputed in backward with the same
    random streams (module docstring)."""
    return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=True,
                                             context_fn=_contexts, **kwargs)


def wanted(module: torch.nn.Module) -> bool:
    """Recompute only what a training backward will need: never in eval or under no_grad."""
    return module.training and torch.is_grad_enabled()


def run_layers(layers: Sequence[Callable], x, *args, method: Optional[str] = None, num_layers: Optional[int] = None):
    """x = layer(x, *args) through `layers` (one pipeline stage's), with Megatron's `full`
    recomputation: `method="uniform"`: chunks of `num_layers` layers, each one
    checkpointed region (the chunk's input is all it keeps); `"block"`: the first
    `num_layers` layers each checkpointed, the rest keep everything; None: no recomputation."""
    if method is None:
        for layer in layers:
            x = layer(x, *args)
        return x
    k = max(1, int(num_layers or 1))
    if method == "uniform":
        for start in range(0, len(layers), k):
            x = checkpoint(_chain(layers[start:start + k]), x, *args)
        return x
    if method == "block":
        for i, layer in enumerate(layers):
            x = checkpoint(layer, x, *args) if i < k else layer(x, *args)
        return x
    raise ValueError(f"recompute method must be 'uniform' or 'block', got {method!r}")


def _chain(layers: Sequence[Callable]) -> Callable:
    def run(x, *args):
        for layer in layers:
            x = layer(x, *args)
        return x
    return run
