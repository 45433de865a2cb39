"""Base classes of hidden transforms and hidden losses (NeMo's MegatronBaseHiddenTransform
and MegatronBaseHiddenLoss).

Shapes: `hiddens` is sequence-first [S, B, H]; `hiddens_mask` is [B, S] (1 = real).
A loss's `_loss` returns per-position terms [B, S]; `loss()` reduces them to a per-sample
masked mean [B] (a fully padded row gives 0) and a weighted scalar: the MEAN over the
batch, so its weight against the (mean) tokens loss does not grow with the micro-batch
size. NeMo sums over the batch: `nemo_compat=True`.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch


class HiddenTransform(torch.nn.Module):
    """Maps named tensors to new named tensors; override `_transform`, `input_names`,
    `output_names`. Constructors must accept `name` and `model_parallel_cfg`."""

    def __init__(self, name: str = "", model_parallel_cfg=None):
        super().__init__()
        self.name = name
        self.model_parallel_cfg = model_parallel_cfg

    @property
    def input_names(self) -> List[str]:
        return []

    @property
    def output_names(self) -> List[str]:
        return []

    def _validate_inputs(self, inputs: Dict) -> None:
        if not set(self.input_names).issubset(inputs.keys()):
            raise ValueError(f"Inputs should contain {self.input_names}, but got {inputs.keys()}")

    def _transform(self, inputs: Dict, batch_data: Optional[Dict] = None) -> Dict:
        return inputs.copy()

    def transform(self, inputs: Dict, batch_data: Optional[Dict] = None) -> Dict:
        self._validate_inputs(inputs)
        return self._transform(inputs, batch_data=batch_data)

    def __str__(self) -> str:
        return super().__str__() + f"(name={self.name})"


class HiddenLoss(torch.nn.Module):
    """A loss over named tensors; override `_input_names` and `_loss` (returning at least
    "loss" of shape [B, S])."""

    def __init__(self, loss_weight: float = 1.0, name: str = "", nemo_compat: bool = False):
        super().__init__()
        self.loss_weight = float(loss_weight)
        self.name = name
        self.nemo_compat = nemo_compat

    def _input_names(self) -> List[str]:
        return []

    @property
    def input_names(self) -> List[str]:
        return self._input_names() + ["hiddens_mask"]

    def _validate_inputs(self, inputs: Dict) -> None:
        if not set(self.input_names).issubset(inputs.keys()):
            raise ValueError(f"Inputs should contain {self.input_names}, but got {inputs.keys()}")

    def _loss(self, inputs: Dict, batch_data: Optional[Dict] = None) -> Dict:
        raise NotImplementedError("Please implement loss calculations in child class")

    def loss(self, inputs: Dict, batch_data: Optional[Dict] = None) -> Dict:
        self._validate_inputs(inputs)
        out = self._loss(inputs, batch_data=batch_data)
        if "loss" not in out:
            raise KeyError("Loss dict must contain 'loss' key")
        loss = out["loss"]
        mask = inputs["hiddens_mask"].to(loss)
        per_sample = (mask * loss).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        weighted = self.loss_weight * (per_sample.sum() if self.nemo_compat else per_sample.mean())
        out["loss"] = per_sample
        out["weighted_loss"] = weighted
        out["weight_loss"] = torch.tensor(self.loss_weight).to(weighted)
        return out

    def __str__(self) -> str:
        return super().__str__() + f"(name={self.name})"


# NeMo's names, so code written against NeMo's hiddens API reads the same.
MegatronBaseHiddenTransform = HiddenTransform
MegatronBaseHiddenLoss = HiddenLoss
