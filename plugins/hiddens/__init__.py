"""Hidden transforms and losses for encoder-decoder models (MIM / VAE), with NeMo's
Python API. See docs/plugins.md and specs/hiddens.md."""
from mega.plugins.hiddens.base import HiddenLoss, HiddenTransform, MegatronBaseHiddenLoss, MegatronBaseHiddenTransform
from mega.plugins.hiddens.losses import AMIMLoss, GuidedClassifierLoss, VAELoss
from mega.plugins.hiddens.module import HiddensModule
from mega.plugins.hiddens.registry import (
    get_hiddens_module,
    get_registered_hiddens,
    register_hidden_loss,
    register_hidden_transform,
)
from mega.plugins.hiddens.transforms import GaussianTransform, GuidedClassifierTransform

MegatronHiddensModule = HiddensModule

__all__ = [
    "HiddenLoss", "HiddenTransform", "MegatronBaseHiddenLoss", "MegatronBaseHiddenTransform", "AMIMLoss", "VAELoss",
    "GuidedClassifierLoss", "GaussianTransform", "GuidedClassifierTransform", "HiddensModule", "MegatronHiddensModule",
    "get_hiddens_module", "get_registered_hiddens", "register_hidden_loss", "register_hidden_transform",
]
