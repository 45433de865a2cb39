"""Registers the first-party hidden transforms and losses through mega's hooks, each with
the config class its table in `model.hiddens.transform` / `model.hiddens.loss` becomes."""
from __future__ import annotations

import mega
from mega.plugins.hiddens.losses import (
    AMIMLoss,
    AMIMLossConfig,
    GuidedClassifierLoss,
    GuidedClassifierLossConfig,
    VAELoss,
    VAELossConfig,
)
from mega.plugins.hiddens.transforms import (
    GaussianTransform,
    GaussianTransformConfig,
    GuidedClassifierTransform,
    GuidedClassifierTransformConfig,
)


@mega.hookimpl
def register_hidden_transforms(register):
    register("cond_gaussian", GaussianTransform, config=GaussianTransformConfig)
    register("guided_cls", GuidedClassifierTransform, config=GuidedClassifierTransformConfig)


@mega.hookimpl
def register_hidden_losses(register):
    register("a_mim", AMIMLoss, config=AMIMLossConfig)
    register("vae", VAELoss, config=VAELossConfig)
    register("guided_cls_loss", GuidedClassifierLoss, config=GuidedClassifierLossConfig)
