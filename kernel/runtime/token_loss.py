"""The loss-weighting rule, written once for every schedule.

The loss of a global batch is the mean over all of its loss-bearing tokens: each
micro-batch contributes (sum of its token losses) / (tokens in the whole global batch),
and so does each of its named loss terms. Summing those shares over micro-batches and
data-parallel ranks gives the same number however the global batch is cut, so
micro-batch size, accumulation and data-parallel size change speed, never the numbers.

A model may add a per-sample loss (a sentence-level head: BERT's next-sentence or
sentence-order loss, a classifier): its micro-batch sum is divided by the number of
samples in the whole global batch instead, by the same argument. A model with only a
per-sample loss (no loss tokens at all) works too: its token count is never a divisor.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from mega.protocols import LossOutput


class TokenMean:
    """Accumulates one global batch's loss and terms on this rank, micro-batch by micro-batch.

    `num_tokens` is the count of loss-bearing tokens in the whole global batch (over every
    micro-batch and data-parallel rank), `num_samples` its count of samples (needed only
    by models that return `sample_loss_sum`), so `loss` and `terms` are this rank's shares
    of the global means.
    """

    def __init__(self, num_tokens: torch.Tensor, num_samples: Optional[torch.Tensor] = None):
        self.num_tokens = num_tokens
        self.num_samples = num_samples
        self.loss = torch.zeros((), device=num_tokens.device)
        self.terms: Dict[str, torch.Tensor] = {}

    def add(self, out: LossOutput) -> torch.Tensor:
        """Count a micro-batch's `training_loss` output ({"loss_sum", "sample_loss_sum",
        "terms", "sample_terms"}, at least one of the two sums); return its share of the
        loss, still attached to the graph, for backward."""
        if "loss_sum" not in out and "sample_loss_sum" not in out:
            raise ValueError(f"training_loss returned neither loss_sum nor sample_loss_sum (keys: {sorted(out)})")
        loss = out["loss_sum"] / self.num_tokens if "loss_sum" in out else None
        if "sample_loss_sum" in out or out.get("sample_terms"):
            if self.num_samples is None:
                raise ValueError("a per-sample loss needs the global batch's sample count (num_samples)")
            if "sample_loss_sum" in out:
                share = out["sample_loss_sum"] / self.num_samples
                loss = share if loss is None else loss + share
        self.loss += loss.detach()
        for name, value in out.get("terms", {}).items():
            self.terms[name] = self.terms.get(name, 0.0) + value.detach() / self.num_tokens
        for name, value in out.get("sample_terms", {}).items():
            self.terms[name] = self.terms.get(name, 0.0) + value.detach() / self.num_samples
        return loss
