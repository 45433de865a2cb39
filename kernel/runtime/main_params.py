"""Megatron's mixed-precision layout: bf16 model parameters, fp32 main weights owned by the
optimizer, gradients accumulated and all-reduced in fp32 (`model.megatron_amp_O2`).

Under plain `trainer.precision = "bf16"` the parameters stay fp32 and every forward casts
them to bf16 under autocast (and every backward casts their gradients back). In this
layout the model itself holds bf16 parameters, so forward and backward run in bf16 with no
cast of a weight, and precision is kept where it matters:

* main weights: the model's original fp32 parameters. They are what the optimizer was
  built over, so it never sees a bf16 tensor, its state dict is the fp32 layout's, and any
  registered optimizer works unchanged. The bf16 parameters replace them in the model's
  modules (`convert`), and after every optimizer step they are rounded from them
  (`copy_to_model`).
* main gradients (Megatron's `main_grad`): one flat fp32 buffer with a view per parameter.
  A hook that runs when autograd has finished a parameter's bf16 gradient of one
  micro-batch adds it into the view and frees it, so micro-batches accumulate in fp32
  (Megatron's `--accumulate-allreduce-grads-in-fp32`, which it forces on for bf16).
* data parallelism: the flat buffer is all-reduced in fp32 (no DDP wrapper: DDP would
  reduce bf16 `.grad`s), then averaged. It is laid out in reverse parameter order and cut
  into buckets of about `bucket_size` elements (`model.grad_reduce_bucket_size`,
  Megatron's `--overlap-grad-reduce` with its DDP buckets): during the last micro-batch's
  backward a bucket's all-reduce starts, asynchronously, as soon as the hooks of all its
  parameters have run, so it overlaps the rest of the backward. Buckets start strictly in
  order, so every replica issues the same collectives in the same order; one holding a
  parameter that got no gradient starts after the backward (`reduce_grads`), which waits
  for them all. Earlier micro-batches run inside `no_sync()` (as under DDP) and start
  nothing. `bucket_size = 0`: one all-reduce of the whole buffer after the backward.
* pipeline parallelism: each stage converts and steps its own parameters; the tied word
  embedding's fp32 main gradient is summed over the first and last stage (the embedding
  group) after the data-parallel reduction, as the fp32 layout does with `.grad`
  (`mega.runtime.pipeline.sum_pipeline_grads`).
* clipping and the optimizer step run on the fp32 main weights, whose `.grad` is the
  buffer's view (no copy).

Checkpoints hold the main weights in the model's state-dict layout (`state_dict`), so a
checkpoint of this layout is an fp32 checkpoint: exports, converters and a run without
the switch read it as they read any other, and a resumed run rounds the same bf16
parameters from it, bit for bit.

With `trainer.precision = 16` the parameters are fp16 instead and the fp16 loss scaler
works as in the autocast layout, on the fp32 main gradients: the scaled loss's fp16
gradients accumulate in fp32, then are unscaled and checked for inf/nan there; a skipped
step leaves main weights and parameters alone.

The conversion happens at the first training step (`prepare`), after resuming and after
`on_train_start` hooks (a fine-tuning task loads its pretrained encoder there), so
whatever was loaded into the fp32 model becomes the main weights. Model buffers (rotary
frequencies, masks) are left as they are.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterable, List, Optional

import torch
import torch.distributed as dist

from mega.runtime.pipeline import ties_embedding

DTYPES = {"bf16": torch.bfloat16, "16": torch.float16}
DEFAULT_BUCKET_SIZE = 40_000_000  # elements per all-reduce bucket (Megatron's default)


class _Bucket:
    """A contiguous slice of the fp32 gradient buffer, all-reduced as one collective."""

    def __init__(self, view: torch.Tensor, params: List[torch.nn.Parameter]):
        self.view = view
        self.params = params
        self.pending = len(params)  # parameters whose last-micro-batch hook has not run yet
        self.handle = None  # the async all-reduce once started


class MainParams:
    """The fp32 main weights and gradients of a model whose parameters are held in
    `dtype`; `optimizer` must have been built over the model's (fp32) parameters."""

    sharded = False  # the main weights are whole here (mega.runtime.distrib_optimizer shards them)

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype = torch.bfloat16, dp_group=None, dp_size: int = 1,
                 bucket_size: int = DEFAULT_BUCKET_SIZE, embedding_group=None):
        self.model = model
        self.dtype = dtype
        self.dp_group = dp_group
        self.dp_size = dp_size
        self.bucket_size = bucket_size  # 0: one all-reduce after the backward, no overlap
        self.embedding_group = embedding_group  # first + last pipeline stage: their tied word embedding
        self.shared: Optional[torch.nn.Parameter] = None  # this stage's (16-bit) tied word embedding
        self.buckets: List[_Bucket] = []  # data-parallel all-reduce buckets, in launch order
        self._bucket_of: Dict[int, _Bucket] = {}
        self._next = 0  # the first bucket not started in this step
        self._syncing = True  # False inside no_sync(): hooks only accumulate
        self.converted = False
        self.main: List[torch.nn.Parameter] = []  # fp32: the model's original parameters
        self.params: List[torch.nn.Parameter] = []  # self.dtype: what the model now holds, same order
        self.to_main: Dict[int, torch.nn.Parameter] = {}  # id(model param) -> main weight
        self.grad_buffer: Optional[torch.Tensor] = None  # flat fp32 main gradients

    # --- conversion -------------------------------------------------------------------------
    def prepare(self) -> None:
        """Convert the model on the first call (see module docstring); every call then
        zeroes the fp32 gradient buffer for a new step."""
        if not self.converted:
            self.convert()
        self.grad_buffer.zero_()
        for p in self.params:
            p.grad = None
            p.main_grad_used = False
        for b in self.buckets:
            b.pending, b.handle = len(b.params), None
        self._next = 0
        self._syncing = True

    @contextlib.contextmanager
    def no_sync(self):
        """Backwards inside accumulate only (every micro-batch but the last), as DDP's."""
        self._syncing = False
        try:
            yield
        finally:
            self._syncing = True

    def convert(self) -> None:
        main = [p for p in self.model.parameters() if p.requires_grad and p.is_floating_point()]
        replacement = {}
        for p in main:
            low = torch.nn.Parameter(p.detach().to(self.dtype), requires_grad=True)
            low.__dict__.update(p.__dict__)  # partition_dim, shared_embedding_copy, ...
            replacement[id(p)] = low
        for module in self.model.modules():  # tied weights: every module holding one gets the same replacement
            for name, p in list(module._parameters.items()):
                if p is not None and id(p) in replacement:
                    module._parameters[name] = replacement[id(p)]
        self.main = main
        self.params = [replacement[id(p)] for p in main]
        self.to_main = {id(low): p for low, p in zip(self.params, main)}
        device = main[0].device if main else torch.device("cpu")
        self.grad_buffer = torch.zeros(sum(p.numel() for p in main), dtype=torch.float32, device=device)
        # Reverse order: backward finishes the last layers' gradients first, and a bucket
        # is a contiguous slice of parameters whose gradients complete at about one time.
        offset, start, members = 0, 0, []
        for low, p in reversed(list(zip(self.params, main))):
            low.main_grad = self.grad_buffer[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
            members.append(low)
            if self.bucket_size and offset - start >= self.bucket_size:
                self.buckets.append(_Bucket(self.grad_buffer[start:offset], members))
                start, members = offset, []
        if members:
            self.buckets.append(_Bucket(self.grad_buffer[start:offset], members))
        self._bucket_of = {id(low): b for b in self.buckets for low in b.params}
        for low in self.params:
            low.register_post_accumulate_grad_hook(self._grad_ready)
        if self.embedding_group is not None and ties_embedding(self.model):
            self.shared = self.model.shared_embedding_or_output_weight()
        self.converted = True

    def _grad_ready(self, param: torch.nn.Parameter) -> None:
        """Autograd finished `param`'s gradient of this micro-batch: add it to the fp32
        buffer and free it, so the next micro-batch starts from no `.grad`; in the last
        micro-batch, start the buckets this completes."""
        _accumulate_into_main_grad(param)
        if not self._syncing or self.dp_size == 1 or not self.bucket_size:
            return
        bucket = self._bucket_of[id(param)]
        if bucket.handle is not None:
            raise RuntimeError("model.megatron_amp_O2: a gradient arrived after its bucket's all-reduce started (a second"
                               " backward outside no_sync() in one step)")
        bucket.pending -= 1
        while self._next < len(self.buckets) and self.buckets[self._next].pending == 0:
            self._start(self.buckets[self._next])

    def _start(self, bucket: _Bucket) -> None:
        bucket.handle = dist.all_reduce(bucket.view, group=self.dp_group, async_op=True)
        self._next += 1

    # --- a step -----------------------------------------------------------------------------
    def reduce_grads(self) -> List[torch.nn.Parameter]:
        """After the last micro-batch's backward: the fp32 gradients averaged over
        data-parallel replicas (the loss was multiplied by their number, as for DDP),
        handed to the main weights as `.grad`; returns the main weights that have one. A
        parameter no micro-batch reached keeps no gradient (as in the fp32 layout), so the
        optimizer skips it."""
        if self.dp_size > 1:
            while self._next < len(self.buckets):  # no overlap, or a parameter without a gradient
                self._start(self.buckets[self._next])
            for b in self.buckets:
                b.handle.wait()
                b.handle = None
            self.grad_buffer.div_(self.dp_size)
        if self.shared is not None:  # the tied word embedding: first stage's + last stage's
            dist.all_reduce(self.shared.main_grad, group=self.embedding_group)
            self.shared.main_grad_used = True
        stepped = []
        for low, p in zip(self.params, self.main):
            # data-parallel replicas step every parameter (as DDP needs every one used), so
            # a parameter one replica's data missed cannot make the replicas diverge
            p.grad = low.main_grad if low.main_grad_used or self.dp_size > 1 else None
            if p.grad is not None:
                stepped.append(p)
        return stepped

    @torch.no_grad()
    def copy_to_model(self) -> None:
        """Round the stepped main weights into the model's parameters."""
        if self.params:
            torch._foreach_copy_(self.params, self.main)

    def sync_params(self) -> None:
        """Nothing is pending here: the model holds its parameters as soon as a step ends."""

    def mains_of(self, params: Iterable[torch.nn.Parameter]) -> List[torch.nn.Parameter]:
        """The main weights the optimizer steps for these model parameters."""
        return [self.to_main[id(p)] for p in params]

    # --- checkpoints ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The model's state dict with the fp32 main weights in place of its parameters."""
        out = {}
        for k, v in self.model.state_dict(keep_vars=True).items():
            out[k] = self.to_main.get(id(v), v).detach()
        return out

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Load an fp32 state dict into the main weights (exactly) and the model."""
        self.model.load_state_dict(state)
        named = self.model.state_dict(keep_vars=True)
        for k, v in named.items():
            if id(v) in self.to_main and k in state:
                self.to_main[id(v)].copy_(state[k])
        self.copy_to_model()

    def tensors(self) -> Iterable[torch.Tensor]:
        """Every tensor this layout adds to the model's: main weights and the grad buffer."""
        yield from self.main
        if self.grad_buffer is not None:
            yield self.grad_buffer


def _accumulate_into_main_grad(param: torch.nn.Parameter) -> None:
    """Autograd finished `param`'s gradient of this micro-batch: add it to the fp32 buffer
    and free it, so the next micro-batch starts from no `.grad`."""
    param.main_grad.add_(param.grad)
    param.main_grad_used = True
    param.grad = None


def check_main_params(config) -> None:
    """Config errors for `model.megatron_amp_O2` where this layout does not apply."""
    from mega.errors import ConfigError

    mc, tr = config.model, config.trainer
    if not getattr(mc, "megatron_amp_O2", False):
        return
    if str(tr.precision) not in DTYPES:
        raise ConfigError(f"model.megatron_amp_O2 = true needs trainer.precision = \"bf16\" or 16 (got {str(tr.precision)!r}):"
                          " the model's parameters are held in that dtype")
