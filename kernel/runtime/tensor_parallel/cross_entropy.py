"""Cross entropy over a vocabulary split across tensor-parallel ranks, without gathering
the logits: the max, the target logit and the softmax denominator are each all-reduced
as scalars per token (Megatron's vocab_parallel_cross_entropy).

With `vocab_size` (the tokenizer's real vocabulary), the rows of the padded vocabulary
(ids >= vocab_size, added so the embedding divides by `make_vocab_size_divisible_by` x TP)
take no part in the softmax: each rank sets the padded columns of its own slice to -inf
before the max and the sum of exponentials. The loss is then the same at every TP size
(whose padding differs), and padded rows get exactly zero gradient through the loss.
Without it, padded logits enter the softmax as in Megatron-LM."""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mega.runtime.parallel import current


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, vocab_size: Optional[int]) -> torch.Tensor:
        state = current()
        local_vocab = logits.shape[-1]
        start = state.tp_rank * local_vocab
        real = local_vocab if vocab_size is None else max(0, min(local_vocab, vocab_size - start))
        if real < local_vocab:  # this slice holds padding: a copy with those columns at -inf
            logits = logits.to(torch.float32, copy=True)
            logits[..., real:] = float("-inf")
        else:
            logits = logits.float()
        # The global max is finite: rank 0 always holds real ids (vocab_size >= 1).
        logits_max = logits.max(dim=-1).values
        dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=state.tp_group)
        logits = logits - logits_max.unsqueeze(-1)
        outside = (target < start) | (target >= start + local_vocab)
        local_target = (target - start).masked_fill(outside, 0)
        predicted = logits.gather(-1, local_target.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        dist.all_reduce(predicted, group=state.tp_group)
        exp = logits.exp()  # exactly 0 on padded columns
        sum_exp = exp.sum(dim=-1)
        dist.all_reduce(sum_exp, group=state.tp_group)
        ctx.save_for_backward(exp.div_(sum_exp.unsqueeze(-1)), outside, local_target)
        return sum_exp.log() - predicted

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        softmax, outside, local_target = ctx.saved_tensors
        grad = softmax  # d loss / d logit = softmax - one_hot(target), on this rank's slice
        grad.scatter_add_(-1, local_target.unsqueeze(-1), -(~outside).unsqueeze(-1).to(grad.dtype))
        return grad * grad_output.unsqueeze(-1), None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor,
                                 vocab_size: Optional[int] = None) -> torch.Tensor:
    """Per-token losses (shape of `target`) from this rank's slice of the logits.

    `vocab_size`: the real vocabulary; logits of ids >= vocab_size (padding) are left out
    of the softmax. None: every column of the padded vocabulary counts (Megatron-LM)."""
    if vocab_size is not None and vocab_size < 1:
        raise ValueError(f"vocab_size must be at least 1, got {vocab_size}")
    if current().tp_size == 1:
        v = logits.shape[-1] if vocab_size is None else min(vocab_size, logits.shape[-1])
        # the slice's backward scatters zeros into the padded columns
        return F.cross_entropy(logits[..., :v].float().reshape(-1, v), target.reshape(-1),
                               reduction="none").view(target.shape)
    return _VocabParallelCrossEntropy.apply(logits, target, vocab_size)
