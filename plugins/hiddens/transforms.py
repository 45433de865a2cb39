"""Hidden transforms: `cond_gaussian` (NeMo's MegatronGaussianHiddenTransform) and `guided_cls` (ours: NeMo
names it in its example config but has no implementation, §1.3), each with the config
class its `model.hiddens.transform.<name>` table is structured into (defaults equal the
constructor's)."""
from __future__ import annotations

import math
from typing import Dict, Optional

import torch
from attrs import define

from mega.config import HiddenTransformConfig, key
from mega.plugins.hiddens.base import HiddenTransform

LOG_2PI = math.log(2.0 * math.pi)


def diag_gaussian_log_prob(z, mean, logvar) -> torch.Tensor:
    """log N(z; mean, diag(exp(logvar))) summed over the last dimension."""
    return (-0.5 * (LOG_2PI + logvar + (z - mean) ** 2 / logvar.exp())).sum(dim=-1)


@define(kw_only=True)
class GaussianTransformConfig(HiddenTransformConfig):
    hidden_size: int = key(help="size of the hiddens (and of the sample z)")
    ffn_hidden_size: Optional[int] = key(None,
            help="unset: 2 x hidden_size (mean and log-variance); nothing else works")
    min_logvar: float = key(-6.0, help="lower bound of the log-variance")
    init_method_std: float = key(0.02, help="std of the projection's initial weights")


class GaussianTransform(HiddenTransform):
    """q(z|x) = N(mean, exp(logvar)) from a linear map of the hiddens, sampled with the
    reparameterisation trick.

    Defaults fix NeMo's recorded defects: in eval mode z is the mean (deterministic
    validation and decoding), and `ffn_hidden_size` other than 2 x hidden_size is refused
    at construction instead of failing at the first step. `nemo_compat=True` samples in
    eval too, exactly as NeMo.
    """

    def __init__(self, hidden_size: int, ffn_hidden_size: Optional[int] = None, min_logvar: float = -6.0,
                 init_method_std: float = 0.02, nemo_compat: bool = False, name: str = "cond_gaussian",
                 model_parallel_cfg=None):
        super().__init__(name=name, model_parallel_cfg=model_parallel_cfg)
        ffn_hidden_size = ffn_hidden_size or 2 * hidden_size
        if ffn_hidden_size != 2 * hidden_size:
            raise ValueError(f"cond_gaussian {name}: ffn_hidden_size={ffn_hidden_size} must be 2 x hidden_size"
                             f" ({2 * hidden_size}): it holds the mean and the log-variance of a hidden_size sample")
        self.hidden_size = hidden_size
        self.min_logvar = min_logvar
        self.nemo_compat = nemo_compat
        self.hiddens_to_mean_logvar = torch.nn.Linear(hidden_size, ffn_hidden_size)
        torch.nn.init.normal_(self.hiddens_to_mean_logvar.weight, 0.0, init_method_std)
        torch.nn.init.zeros_(self.hiddens_to_mean_logvar.bias)

    @property
    def input_names(self):
        return ["hiddens", "hiddens_mask"]

    @property
    def output_names(self):
        return ["z_mean", "z_logvar", "z", "z_log_prob"]

    def _transform(self, inputs: Dict, batch_data=None) -> Dict:
        if "z_mean" in inputs and "z_logvar" in inputs:
            z_mean, z_logvar = inputs["z_mean"], inputs["z_logvar"]
        else:
            z_mean, z_logvar = self.hiddens_to_mean_logvar(inputs["hiddens"]).chunk(2, dim=-1)
        z_logvar = z_logvar.clamp(min=self.min_logvar)
        if "z" in inputs:
            z, z_log_prob = inputs["z"], inputs.get("z_log_prob")
        elif self.training or self.nemo_compat:
            z, z_log_prob = torch.exp(0.5 * z_logvar) * torch.randn_like(inputs["hiddens"]) + z_mean, None
        else:
            z, z_log_prob = z_mean, None
        if z_log_prob is None:
            z_log_prob = diag_gaussian_log_prob(z, z_mean, z_logvar)
        return {"z": z, "z_mean": z_mean, "z_logvar": z_logvar, "z_log_prob": z_log_prob}


@define(kw_only=True)
class GuidedClassifierTransformConfig(HiddenTransformConfig):
    hidden_size: int = key(help="size of the input")
    attr_name: str = key(help="the output: per-position class logits (and the batch key of its labels by default)")
    input_name: str = key("hiddens", help="the output it classifies")
    num_classes: int = key(2, help="classes of the property")
    init_method_std: float = key(0.02, help="std of the classifier's initial weights")


class GuidedClassifierTransform(HiddenTransform):
    """Per-position class logits from a named input: output `attr_name` [S, B, num_classes].
    With `guided_cls_loss` it guides the latent space by a property (the seed's logP /
    QED example); NeMo only names it, so this design is mega's."""

    def __init__(self, hidden_size: int, attr_name: str, input_name: str = "hiddens", num_classes: int = 2,
                 init_method_std: float = 0.02, name: str = "guided_cls", model_parallel_cfg=None):
        super().__init__(name=name, model_parallel_cfg=model_parallel_cfg)
        self.input_name, self.attr_name = input_name, attr_name
        self.classifier = torch.nn.Linear(hidden_size, num_classes)
        torch.nn.init.normal_(self.classifier.weight, 0.0, init_method_std)
        torch.nn.init.zeros_(self.classifier.bias)

    @property
    def input_names(self):
        return [self.input_name, "hiddens_mask"]

    @property
    def output_names(self):
        return [self.attr_name]

    def _transform(self, inputs: Dict, batch_data=None) -> Dict:
        return {self.attr_name: self.classifier(inputs[self.input_name])}
