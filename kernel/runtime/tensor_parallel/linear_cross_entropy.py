"""The output layer and the cross entropy in one step, a chunk of tokens at a time, so the
fp32 logits of the whole micro-batch ([tokens, vocab]: 3.3 GB for 16 x 1024 tokens of a
50k vocabulary) never exist at once.

Why the gradient is computed in the forward pass: the loss is a weighted sum of token
losses (the loss mask), so d(loss)/d(logits) of a chunk is known as soon as its softmax
is. Each chunk's logits are made, turned into the chunk's loss and its gradient with
respect to the hidden states and the output weight, and dropped; backward only scales
the two saved gradients by the incoming scalar. That is three matrix products, as
unchunked (no recomputation), with [chunk, vocab] the largest transient.

The softmax is the vocab-parallel one of `cross_entropy.py` (per token: the max, the
target's logit and the sum of exponentials are all-reduced over the tensor-parallel
group), so under tensor parallelism each rank holds only its vocabulary slice; the
gradient of the hidden states is this rank's part and the caller's `copy_to_tp` sums it.
Padded vocabulary ids (>= `vocab_size`) are left out of the softmax as there.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from mega.runtime.parallel import current


def _all_reduce(x: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    state = current()
    if state.tp_size > 1:
        dist.all_reduce(x, op=op, group=state.tp_group)
    return x


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, target, token_weights, vocab_size: Optional[int], chunk: int, dtype):
        state = current()
        local_vocab = weight.shape[0]
        start = state.tp_rank * local_vocab
        real = local_vocab if vocab_size is None else max(0, min(local_vocab, vocab_size - start))
        want_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        w = weight.to(dtype)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device) if want_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_grad else None
        for lo in range(0, hidden.shape[0], chunk):
            h = hidden[lo:lo + chunk].to(dtype)
            logits = torch.matmul(h, w.t()).float()  # what F.linear under autocast gives, then .float()
            if real < local_vocab:
                logits[:, real:] = float("-inf")
            logits_max = _all_reduce(logits.max(dim=-1).values, dist.ReduceOp.MAX)
            logits.sub_(logits_max.unsqueeze(-1))
            t = target[lo:lo + chunk]
            outside = (t < start) | (t >= start + local_vocab)
            local_t = (t - start).masked_fill(outside, 0)
            predicted = _all_reduce(logits.gather(-1, local_t.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0))
            exp = logits.exp_()  # 0 on padded columns
            sum_exp = _all_reduce(exp.sum(dim=-1))
            tw = token_weights[lo:lo + chunk]
            total += ((sum_exp.log() - predicted) * tw).sum()
            if want_grad:  # d loss / d logits = (softmax - one_hot(target)) x token weight
                grad = exp.div_(sum_exp.unsqueeze(-1))
                grad.scatter_add_(-1, local_t.unsqueeze(-1), -(~outside).unsqueeze(-1).to(grad.dtype))
                grad = grad.mul_(tw.unsqueeze(-1)).to(dtype)
                grad_hidden[lo:lo + chunk] = torch.matmul(grad, w).float()
                grad_weight += torch.matmul(grad.t(), h).float()
        if want_grad:
            ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        return ((grad_hidden * grad_output).to(h_dtype), (grad_weight * grad_output).to(w_dtype),
                None, None, None, None, None)


def chunked_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                                 token_weights: torch.Tensor, vocab_size: Optional[int] = None,
                                 chunk_size: int = 4096) -> torch.Tensor:
    """sum over tokens of token_weights x cross_entropy(hidden @ weight.T, target), with
    `weight` this rank's vocabulary slice [vocab / TP, hidden] and `hidden` [..., hidden]
    already through `copy_to_tp`; `chunk_size` tokens at a time. Under autocast the
    matrix products run in the autocast dtype, as `F.linear` would; the softmax in fp32.
    `vocab_size`: the real vocabulary (padded ids out of the softmax); None: all count."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    h = hidden.reshape(-1, hidden.shape[-1])
    with torch.autocast(device, enabled=False):
        return _ChunkedLinearCrossEntropy.apply(h, weight, target.reshape(-1), token_weights.reshape(-1).float(),
                                                vocab_size, chunk_size, dtype)
