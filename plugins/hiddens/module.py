"""The hiddens module: runs transforms in order over named outputs, then the losses, and
forms the joint loss (NeMo's MegatronHiddensModule); and
`HiddensConfig`, the `model.hiddens` table of an encoder-decoder.

Validation happens at construction, in NeMo's order and with its messages: every output
a loss or transform needs must be produced by an earlier transform, and no output may be
produced twice.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
from attrs import define

from mega.config import HiddenLossConfig, HiddenTransformConfig, key, NamedTables
from mega.plugins.hiddens.base import HiddenLoss, HiddenTransform


@define(kw_only=True)
class HiddensConfig:
    """`model.hiddens.*`: transforms and losses between encoder and decoder (docs/hiddens.md).

    `transform` and `loss` are each a table `{name = {cls_name = ..., ...}}` or an array of
    such tables (order kept); each entry is structured into the config class its `cls_name`
    registered."""

    enc_output_name: str = key("hiddens", help='the output the decoder cross-attends to (e.g. "z")')
    tokens_loss_weight: float = key(1.0, help="weight of the tokens loss in the joint loss")
    nemo_compat: bool = key(False, help="reproduce NeMo exactly (docs/hiddens.md); tokens_loss_weight is then 1.0")
    transform: NamedTables[HiddenTransformConfig] = key(factory=dict, help="named transforms, run in order")
    loss: NamedTables[HiddenLossConfig] = key(factory=dict, help="named losses")


class HiddensModule(torch.nn.Module):
    def __init__(self, hidden_transforms: List[HiddenTransform] = (), hidden_loss_transforms: List[HiddenLoss] = (),
                 enc_output_name: str = "hiddens", tokens_loss_weight: float = 1.0, loss_prefix: str = "hiddens_"):
        super().__init__()
        if not all(isinstance(l, HiddenLoss) for l in hidden_loss_transforms):
            raise TypeError(f"hidden_loss_transforms should be a list of MegatronBaseHiddenLoss, but got {hidden_loss_transforms}")
        if not all(isinstance(t, HiddenTransform) for t in hidden_transforms):
            raise TypeError(f"hidden_transforms should be a list of MegatronBaseHiddenTransform, but got {hidden_transforms}")
        self.hidden_transforms = torch.nn.ModuleList(hidden_transforms)
        self.hidden_loss_transforms = torch.nn.ModuleList(hidden_loss_transforms)
        self.enc_output_name = enc_output_name
        self.tokens_loss_weight = tokens_loss_weight
        self.loss_prefix = loss_prefix

        available = {"hiddens", "hiddens_mask", "enc_output"}
        dups = {}
        for t in self.hidden_transforms:
            missing = set(t.input_names) - available
            if missing:
                raise ValueError(f"Hidden transform {t.name} requires inputs {missing} that are not available")
            overlap = set(t.output_names) & available
            if overlap:
                dups[t.name] = list(overlap)
            available |= set(t.output_names)
        if dups:
            raise ValueError(f"Hidden transforms have duplicate outputs {{name: [duplicate outputs]}} = {dups}")
        loss_inputs = set().union(*(l.input_names for l in self.hidden_loss_transforms)) if len(self.hidden_loss_transforms) else set()
        if not loss_inputs.issubset(available):
            per_loss = {l.name: l.input_names for l in self.hidden_loss_transforms}
            raise ValueError(
                f"Loss transforms inputs = {loss_inputs - available} are not supported by hidden transforms with"
                f" hidden_outputs = {available}, expected inputs per loss = {per_loss}"
            )

    @property
    def hidden_outputs(self) -> List[str]:
        return list(set().union({"hiddens", "hiddens_mask"}, *(t.output_names for t in self.hidden_transforms)))

    @property
    def loss_inputs(self) -> List[str]:
        return list(set().union(*(l.input_names for l in self.hidden_loss_transforms)))

    def apply_hidden_transforms(self, inputs: Dict, batch_data: Optional[Dict] = None) -> Dict:
        outputs = inputs.copy()
        for t in self.hidden_transforms:
            outputs.update(t.transform(outputs, batch_data=batch_data))
        outputs["enc_output"] = outputs[self.enc_output_name]
        return outputs

    def apply_loss_transforms(self, outputs: Dict, batch_data: Optional[Dict] = None) -> Dict:
        joint = 0.0
        loss_dict: Dict = {}
        for i, l in enumerate(self.hidden_loss_transforms):
            d = l.loss(outputs, batch_data=batch_data)
            joint = joint + d.pop("weighted_loss")
            if l.name:
                d = {f"{l.name}_{k}": v for k, v in d.items()}
            dups = set(d) & set(loss_dict)
            if dups:
                raise ValueError(f"Loss transform ({i}) {str(l)} is trying to override the following loss keys {list(dups)}")
            loss_dict.update(d)
        loss_dict["loss"] = joint
        if self.loss_prefix:
            loss_dict = {f"{self.loss_prefix}{k}": v for k, v in loss_dict.items()}
        loss_dict["tokens_loss_weight"] = torch.as_tensor(self.tokens_loss_weight).to(joint) if torch.is_tensor(joint) \
            else torch.tensor(self.tokens_loss_weight, dtype=torch.float64)
        return loss_dict

    def joint_loss(self, loss_dict: Dict, tokens_loss: torch.Tensor) -> torch.Tensor:
        """hiddens_loss + tokens_loss_weight x tokens_loss (NeMo's joint loss)."""
        return loss_dict[f"{self.loss_prefix}loss"] + loss_dict["tokens_loss_weight"] * tokens_loss
