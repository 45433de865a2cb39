"""The token-weighted loss rule, written once for every schedule.

The loss of a global batch is the mean over all of its loss-bearing tokens: each
micro-batch contributes (sum of its token losses) / (tokens in the whole global batch),
and so does each of its named loss terms. Summing those shares over micro-batches and
data-parallel ranks gives the same number however the global batch is cut, so
micro-batch size, accumulation and data-parallel size change speed, never the numbers.
"""
from __future__ import annotations

from typing import Dict

import torch

from mega.protocols import LossOutput


class TokenMean:
    """Accumulates one global batch's loss and terms on this rank, micro-batch by micro-batch.

    `num_tokens` is the count of loss-bearing tokens in the whole global batch (over every
    micro-batch and data-parallel rank), so `loss` and `terms` are this rank's shares of
    the global mean.
    """

    def __init__(self, num_tokens: torch.Tensor):
        self.num_tokens = num_tokens
        self.loss = torch.zeros((), device=num_tokens.device)
        self.terms: Dict[str, torch.Tensor] = {}

    def add(self, out: LossOutput) -> torch.Tensor:
        """Count a micro-batch's `training_loss` output ({"loss_sum", optional "terms"});
        return its share of the loss, still attached to the graph, for backward."""
        loss = out["loss_sum"] / self.num_tokens
        self.loss += loss.detach()
        for name, value in out.get("terms", {}).items():
            self.terms[name] = self.terms.get(name, 0.0) + value.detach() / self.num_tokens
        return loss
