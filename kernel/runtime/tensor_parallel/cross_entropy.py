"""Cross entropy over a vocabulary split across tensor-parallel ranks, without gathering
the logits: the max, the target logit and the softmax denominator are each all-reduced
as scalars per token (Megatron's vocab_parallel_cross_entropy)."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mega.runtime.parallel import current


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        state = current()
        logits = logits.float()
        local_vocab = logits.shape[-1]
        logits_max = logits.max(dim=-1).values
        dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=state.tp_group)
        logits = logits - logits_max.unsqueeze(-1)
        start = state.tp_rank * local_vocab
        outside = (target < start) | (target >= start + local_vocab)
        local_target = (target - start).masked_fill(outside, 0)
        predicted = logits.gather(-1, local_target.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        dist.all_reduce(predicted, group=state.tp_group)
        exp = logits.exp()
        sum_exp = exp.sum(dim=-1)
        dist.all_reduce(sum_exp, group=state.tp_group)
        ctx.save_for_backward(exp.div_(sum_exp.unsqueeze(-1)), outside, local_target)
        return sum_exp.log() - predicted

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        softmax, outside, local_target = ctx.saved_tensors
        grad = softmax  # d loss / d logit = softmax - one_hot(target), on this rank's slice
        grad.scatter_add_(-1, local_target.unsqueeze(-1), -(~outside).unsqueeze(-1).to(grad.dtype))
        return grad * grad_output.unsqueeze(-1), None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-token losses (shape of `target`) from this rank's slice of the logits."""
    if current().tp_size == 1:
        v = logits.shape[-1]
        return F.cross_entropy(logits.float().reshape(-1, v), target.reshape(-1), reduction="none").view(target.shape)
    return _VocabParallelCrossEntropy.apply(logits, target)
