"""`seq_pool` transform and `info_nce` loss for mega's hiddens module, shipped through the
`register_hidden_transforms` / `register_hidden_losses` hooks, each with the attrs config
class its `model.hiddens` table is structured into."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from attrs import define

import mega
from mega.config import HiddenLossConfig, HiddenTransformConfig
from mega.config import key as config_key  # InfoNCEConfig has a key named `key`
from mega.plugins.hiddens import HiddenLoss, HiddenTransform

__version__ = "0.1.0"


@define(kw_only=True)
class SeqPoolConfig(HiddenTransformConfig):
    input_name: str = config_key("z", help="the [S, B, H] output to pool")


class SeqPool(HiddenTransform):
    """`<input_name>_pooled` [1, B, H]: the masked mean of `input_name` [S, B, H] over S."""

    def __init__(self, input_name: str = "z", name: str = "seq_pool", model_parallel_cfg=None):
        super().__init__(name=name, model_parallel_cfg=model_parallel_cfg)
        self.input_name = input_name

    @property
    def input_names(self):
        return [self.input_name, "hiddens_mask"]

    @property
    def output_names(self):
        return [f"{self.input_name}_pooled"]

    def _transform(self, inputs, batch_data=None):
        x = inputs[self.input_name]
        m = inputs["hiddens_mask"].to(x).T.unsqueeze(-1)  # [S, B, 1]
        pooled = (x * m).sum(0, keepdim=True) / m.sum(0, keepdim=True).clamp(min=1.0)
        return {f"{self.input_name}_pooled": pooled}


@define(kw_only=True)
class InfoNCEConfig(HiddenLossConfig):
    query: str = config_key("z_pooled", help="a pooled output [1, B, H]")
    key: str = config_key("hiddens_pooled", help="the pooled output each query must pick its own sample's from")
    temperature: float = config_key(0.1, help="divides the cosine similarities")


class InfoNCE(HiddenLoss):
    """-log softmax_b'(cos(q_b, k_b') / temperature)[b]: sample b's query must pick its
    own key among the batch's keys."""

    def __init__(self, query: str = "z_pooled", key: str = "hiddens_pooled", temperature: float = 0.1,
                 loss_weight: float = 1.0, name: str = "info_nce", nemo_compat: bool = False):
        super().__init__(loss_weight=loss_weight, name=name, nemo_compat=nemo_compat)
        self.query, self.key, self.temperature = query, key, temperature

    def _input_names(self):
        return [self.query, self.key]

    def _loss(self, inputs, batch_data=None):
        q = F.normalize(inputs[self.query][0], dim=-1)  # [B, H]
        k = F.normalize(inputs[self.key][0], dim=-1)
        logits = q @ k.T / self.temperature
        own = torch.arange(q.shape[0], device=logits.device)  # on the logits' device (a GPU in a GPU run)
        per_sample = F.cross_entropy(logits, own, reduction="none")
        s = inputs["hiddens_mask"].shape[1]
        return {"loss": per_sample[:, None].expand(-1, s), "accuracy": (logits.argmax(-1) == own).float()[:, None].expand(-1, s)}


@mega.hookimpl
def register_hidden_transforms(register):
    register("seq_pool", SeqPool, config=SeqPoolConfig)


@mega.hookimpl
def register_hidden_losses(register):
    register("info_nce", InfoNCE, config=InfoNCEConfig)
