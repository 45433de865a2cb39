"""Registers the first-party hidden transforms and losses through mega's hooks."""
from __future__ import annotations

import mega
from mega.plugins.hiddens.losses import AMIMLoss, GuidedClassifierLoss, VAELoss
from mega.plugins.hiddens.transforms import GaussianTransform, GuidedClassifierTransform


@mega.hookimpl
def register_hidden_transforms(register):
    register("cond_gaussian", GaussianTransform)
    register("guided_cls", GuidedClassifierTransform)


@mega.hookimpl
def register_hidden_losses(register):
    register("a_mim", AMIMLoss)
    register("vae", VAELoss)
    register("guided_cls_loss", GuidedClassifierLoss)
