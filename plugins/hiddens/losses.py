"""Hidden losses: `a_mim`, `vae` (NeMo's A-MIM and VAE losses) and `guided_cls_loss` (ours),
each with the config class its `model.hiddens.loss.<name>` table is structured into
(defaults equal the constructor's; `loss_weight` comes from `HiddenLossConfig`)."""
from __future__ import annotations

import math
from typing import Dict, Literal, Optional

import torch
import torch.nn.functional as F
from attrs import define

from mega.config import HiddenLossConfig, key
from mega.plugins.hiddens.base import HiddenLoss

LOG_2PI = math.log(2.0 * math.pi)


def std_normal_log_prob(z: torch.Tensor) -> torch.Tensor:
    """Element-wise log N(z; 0, 1)."""
    return -0.5 * (LOG_2PI + z ** 2)


@define(kw_only=True)
class AMIMLossConfig(HiddenLossConfig):
    hidden_aggregation_method: Literal["sum", "mean"] = key("sum",
            help="how log P(z) is reduced over the hidden dimension")


class AMIMLoss(HiddenLoss):
    """A-MIM (arXiv 2003.02645) with a unit-normal anchor:
    loss = -1/2 (log P(z) + log q(z|x)), per position."""

    def __init__(self, loss_weight: float = 1.0, hidden_aggregation_method: str = "sum", name: str = "mim",
                 nemo_compat: bool = False):
        super().__init__(loss_weight=loss_weight, name=name, nemo_compat=nemo_compat)
        if hidden_aggregation_method not in ("sum", "mean"):
            raise ValueError(f"a_mim {name}: hidden_aggregation_method must be 'sum' or 'mean', got {hidden_aggregation_method!r}")
        self.hidden_aggregation_method = hidden_aggregation_method

    def _input_names(self):
        return ["z", "z_log_prob"]

    def _loss(self, inputs: Dict, batch_data=None) -> Dict:
        log_prob_p = getattr(std_normal_log_prob(inputs["z"]), self.hidden_aggregation_method)(dim=-1)
        log_prob_q = inputs["z_log_prob"]
        loss = -0.5 * (log_prob_p + log_prob_q)
        return {"loss": loss.transpose(0, 1), "log_prob_P_z": log_prob_p.transpose(0, 1),
                "log_prob_q_z_given_x": log_prob_q.transpose(0, 1)}


@define(kw_only=True)
class VAELossConfig(HiddenLossConfig):
    min_kl_value: Optional[float] = key(None, help="free-bits floor on the per-position KL; unset: none")


class VAELoss(HiddenLoss):
    """The KL part of a VAE (arXiv 1312.6114) with a unit-normal prior, as a single-sample
    estimate kl = log q(z|x) - log p(z).

    Default: loss = kl, so minimising the joint loss minimises the KL (the ELBO), and
    `min_kl_value` is a free-bits floor (kl clamped from below per position). NeMo returns
    -kl and ignores `min_kl_value` (a NeMo defect; docs/hiddens.md): `nemo_compat=True`
    reproduces that exactly.
    """

    def __init__(self, loss_weight: float = 1.0, min_kl_value: Optional[float] = None, nemo_compat: bool = False,
                 name: str = "vae"):
        super().__init__(loss_weight=loss_weight, name=name, nemo_compat=nemo_compat)
        self.min_kl_value = None if min_kl_value is None else float(min_kl_value)

    def _input_names(self):
        return ["z", "z_log_prob"]

    def _loss(self, inputs: Dict, batch_data=None) -> Dict:
        log_prob_p = std_normal_log_prob(inputs["z"]).sum(dim=-1)
        log_prob_q = inputs["z_log_prob"]
        kl_div = log_prob_q - log_prob_p
        if self.nemo_compat:
            loss = -kl_div
        else:
            loss = kl_div if self.min_kl_value is None else kl_div.clamp(min=self.min_kl_value)
        return {"loss": loss.transpose(0, 1), "kl_div": kl_div.transpose(0, 1),
                "log_prob_p_z": log_prob_p.transpose(0, 1), "log_prob_q_z_given_x": log_prob_q.transpose(0, 1)}


@define(kw_only=True)
class GuidedClassifierLossConfig(HiddenLossConfig):
    input_name: str = key(help="the logits it scores (a guided_cls output)")
    label_key: Optional[str] = key(None, help="the batch key of the labels; unset: input_name")


class GuidedClassifierLoss(HiddenLoss):
    """Cross entropy of per-position logits `input_name` [S, B, C] against the sample's
    class `batch_data[label_key]` [B]."""

    def __init__(self, input_name: str, label_key: Optional[str] = None, loss_weight: float = 1.0,
                 name: str = "guided_cls_loss", nemo_compat: bool = False):
        super().__init__(loss_weight=loss_weight, name=name, nemo_compat=nemo_compat)
        self.input_name = input_name
        self.label_key = label_key or input_name

    def _input_names(self):
        return [self.input_name]

    def _loss(self, inputs: Dict, batch_data=None) -> Dict:
        if not batch_data or self.label_key not in batch_data:
            raise KeyError(f"guided_cls_loss {self.name}: batch has no labels {self.label_key!r}")
        logits = inputs[self.input_name]  # [S, B, C]
        labels = batch_data[self.label_key].to(logits.device).long()  # [B]
        s, b, c = logits.shape
        ce = F.cross_entropy(logits.reshape(s * b, c).float(), labels.repeat(s), reduction="none").view(s, b)
        return {"loss": ce.transpose(0, 1).to(logits.dtype)}
