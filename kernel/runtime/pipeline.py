"""Schedules: how one global batch's micro-batches run forward and backward on this rank.

Both schedules have megatron-core's `forward_backward_func` shape: a forward-step callable,
the micro-batches, and whether to run forward only. They know nothing of the training
run: the caller's `forward_step(batch, hidden)` owns the model and its autocast, and the
caller says by how much to scale the loss before backward (the fp16 loss scale, DDP's
averaging). Both return this rank's share of the batch's (loss, terms) under the
token-weighted rule of `mega.runtime.token_loss`.

`forward_backward_no_pipelining` is the plain gradient-accumulation loop.
`forward_backward_pipelining` is the non-interleaved 1F1B schedule: stage p runs its layers
for every micro-batch; after a warm-up of (stages - p - 1) forwards it alternates one
forward and one backward, so at most `stages` micro-batches' activations are alive at
once; then it drains the remaining backwards. Activations go forward and their gradients
come back through batched isend/irecv pairs (deadlock-free on gloo and NCCL alike).

A model that supports pipelining is a `mega.protocols.PipelineStage`; the word embedding
its first and last stage share (`shared_embedding_or_output_weight()`) gets its gradient
added up over the two by `sum_pipeline_grads`, as Megatron-LM's
`setup_embeddings_and_output_layer` arranges (under `model.megatron_amp_O2`,
`mega.runtime.main_params` does that on its fp32 main gradients instead, and the hidden
states travel in the parameters' 16-bit dtype).
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from mega.protocols import Batch
from mega.runtime.parallel import ParallelState
from mega.runtime.token_loss import TokenMean

# forward_step(batch, hidden): one micro-batch through this rank's stage; the training_loss
# dict on the last stage (the only stage without pipelining), hidden states elsewhere.
ForwardStep = Callable[[Batch, Optional[torch.Tensor]], Any]
Losses = Tuple[torch.Tensor, Dict[str, torch.Tensor]]


def forward_backward_no_pipelining(forward_step: ForwardStep, micro_batches: List[Batch], num_tokens: torch.Tensor, *,
                                   loss_scale: float = 1.0, forward_only: bool = False,
                                   no_sync: Optional[Callable[[], Any]] = None,
                                   num_samples: Optional[torch.Tensor] = None) -> Losses:
    """Each micro-batch forward then backward, gradients accumulating in `.grad`. `no_sync`
    (DDP's) is entered around every micro-batch but the last, so gradients are reduced once.
    `num_samples`: the global batch's sample count, for models with a per-sample loss."""
    losses = TokenMean(num_tokens, num_samples)
    for i, batch in enumerate(micro_batches):
        with no_sync() if no_sync is not None and i < len(micro_batches) - 1 else contextlib.nullcontext():
            loss = losses.add(forward_step(batch, None))
            if not forward_only:
                (loss * loss_scale).backward()
    return losses.loss, losses.terms


def forward_backward_pipelining(forward_step: ForwardStep, micro_batches: List[Batch], num_tokens: torch.Tensor, *,
                                parallel: ParallelState, device: torch.device, tensor_shape,
                                loss_scale: float = 1.0, forward_only: bool = False,
                                num_samples: Optional[torch.Tensor] = None, dtype: torch.dtype = torch.float32,
                                no_sync: Optional[Callable[[], Any]] = None) -> Losses:
    """1F1B over this rank's pipeline; `tensor_shape` and `dtype` are the shape and dtype
    of the hidden states (and their gradients) between stages: fp32 by default, the
    parameters' dtype for a model that holds 16-bit parameters (Megatron's
    `pipeline_dtype`). `no_sync` is entered around every backward but the last (of the
    last micro-batch), so a gradient all-reduce can overlap that one.
    Every stage returns the last stage's (loss, terms)."""
    st = parallel
    prev = None if st.is_first_stage else st.pp_ranks[st.pp_rank - 1]
    nxt = None if st.is_last_stage else st.pp_ranks[st.pp_rank + 1]
    losses = TokenMean(num_tokens, num_samples)

    def p2p(send: Optional[torch.Tensor] = None, to: Optional[int] = None, recv_from: Optional[int] = None):
        """Send to and/or receive from a neighbour stage in one batch; a None rank (no
        stage there) skips that half."""
        ops, buf = [], None
        if to is not None:
            ops.append(dist.P2POp(dist.isend, send.detach().contiguous(), to))
        if recv_from is not None:
            buf = torch.empty(tensor_shape, device=device, dtype=dtype)
            ops.append(dist.P2POp(dist.irecv, buf, recv_from))
        for req in dist.batch_isend_irecv(ops) if ops else ():
            req.wait()
        return buf

    def forward(i: int, hidden):
        if hidden is not None:  # received from the previous stage; backward needs its gradient
            hidden.requires_grad_(not forward_only)
        out = forward_step(micro_batches[i], hidden)
        return losses.add(out) * loss_scale if st.is_last_stage else out.to(dtype)

    m = len(micro_batches)
    backwards = [0]

    def backward(inp, out, grad_out):
        backwards[0] += 1
        with no_sync() if no_sync is not None and backwards[0] < m else contextlib.nullcontext():
            torch.autograd.backward(out, grad_tensors=grad_out)
        return None if inp is None else inp.grad

    if forward_only:
        for i in range(m):
            p2p(forward(i, p2p(recv_from=prev)), to=nxt)
        return _from_last_stage(losses, st)
    warmup = min(st.pp_size - st.pp_rank - 1, m)
    inputs, outputs = [], []
    for i in range(warmup):
        inputs.append(p2p(recv_from=prev))
        outputs.append(forward(i, inputs[-1]))
        p2p(outputs[-1], to=nxt)
    remaining = m - warmup
    inp = p2p(recv_from=prev) if remaining > 0 else None
    for i in range(remaining):
        inputs.append(inp)
        outputs.append(forward(warmup + i, inp))
        grad_out = p2p(outputs[-1], to=nxt, recv_from=nxt)
        grad_in = backward(inputs.pop(0), outputs.pop(0), grad_out)
        inp = p2p(grad_in, to=prev, recv_from=None if i == remaining - 1 else prev)
    for _ in range(warmup):
        p2p(backward(inputs.pop(0), outputs.pop(0), p2p(recv_from=nxt)), to=prev)
    return _from_last_stage(losses, st)


def _from_last_stage(losses: TokenMean, st: ParallelState) -> Losses:
    """Loss and terms, broadcast from the last stage to every stage of the pipeline."""
    box = [sorted(losses.terms) if st.is_last_stage else None]
    dist.broadcast_object_list(box, src=st.pp_ranks[-1], group=st.pp_group)
    names = box[0]
    values = torch.stack([losses.loss] + [losses.terms[n] if st.is_last_stage else torch.zeros_like(losses.loss)
                                          for n in names])
    dist.broadcast(values, src=st.pp_ranks[-1], group=st.pp_group)
    return values[0], dict(zip(names, values[1:]))


def ties_embedding(model: torch.nn.Module) -> bool:
    """Whether the model's output layer is its word embedding (megatron-core's
    `share_embeddings_and_output_weights`, true unless the model says otherwise): only
    then do the first and last stage share a matrix whose gradients are summed."""
    return bool(getattr(model, "share_embeddings_and_output_weights", True))


def sum_pipeline_grads(model: torch.nn.Module, parallel: ParallelState) -> None:
    """After a pipelined backward: add up the tied word embedding's gradient over the first
    and last stage, then every gradient over data-parallel replicas in one flat buffer
    (pipelines do not use DDP: their backwards interleave with other micro-batches' forwards)."""
    if parallel.embedding_group is not None and ties_embedding(model):
        w = model.shared_embedding_or_output_weight()
        if w.grad is None:
            w.grad = torch.zeros_like(w)
        dist.all_reduce(w.grad, group=parallel.embedding_group)
    if parallel.dp_size > 1:
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat, group=parallel.dp_group)
        for g, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
            g.copy_(synced)
