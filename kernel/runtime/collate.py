"""Stacking samples into a batch: the one rule every batch in mega is made by (training,
evaluation, a task's predictions), so a plugin that batches its own samples gets the
same tensors the loop would give it."""
from __future__ import annotations

from typing import Dict, Sequence

import torch


def collate(samples: Sequence[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """Samples (dicts of equal-shaped tensors with the same keys) -> one dict of tensors
    with a leading batch dimension."""
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}
