"""Hidden transforms and losses for encoder-decoder models (MIM / VAE), with NeMo's
Python API. Each component registers with an attrs config class subclassing
`mega.config.HiddenTransformConfig` / `HiddenLossConfig`; `HiddensConfig` is the
`model.hiddens` table. See docs/hiddens.md."""
import mega
from mega.config import HiddenLossConfig, HiddenTransformConfig
from mega.plugins.hiddens.base import HiddenLoss, HiddenTransform, MegatronBaseHiddenLoss, MegatronBaseHiddenTransform
from mega.plugins.hiddens.losses import (
    AMIMLoss,
    AMIMLossConfig,
    GuidedClassifierLoss,
    GuidedClassifierLossConfig,
    VAELoss,
    VAELossConfig,
)
from mega.plugins.hiddens.module import HiddensConfig, HiddensModule
from mega.plugins.hiddens.registry import (
    get_hiddens_module,
    get_registered_hiddens,
    register_hidden_loss,
    register_hidden_transform,
)
from mega.plugins.hiddens.transforms import (
    GaussianTransform,
    GaussianTransformConfig,
    GuidedClassifierTransform,
    GuidedClassifierTransformConfig,
)

MegatronHiddensModule = HiddensModule

__all__ = [
    "HiddenLoss", "HiddenTransform", "MegatronBaseHiddenLoss", "MegatronBaseHiddenTransform", "AMIMLoss", "VAELoss",
    "GuidedClassifierLoss", "GaussianTransform", "GuidedClassifierTransform", "HiddensModule", "MegatronHiddensModule",
    "get_hiddens_module", "get_registered_hiddens", "register_hidden_loss", "register_hidden_transform",
    "HiddensConfig", "HiddenTransformConfig", "HiddenLossConfig", "GaussianTransformConfig",
    "GuidedClassifierTransformConfig", "AMIMLossConfig", "VAELossConfig", "GuidedClassifierLossConfig",
]


# --- registration: the first-party components, each with its config class ---------------------


@mega.hookimpl
def register_hidden_transforms(register):
    register("cond_gaussian", GaussianTransform, config=GaussianTransformConfig)
    register("guided_cls", GuidedClassifierTransform, config=GuidedClassifierTransformConfig)


@mega.hookimpl
def register_hidden_losses(register):
    register("a_mim", AMIMLoss, config=AMIMLossConfig)
    register("vae", VAELoss, config=VAELossConfig)
    register("guided_cls_loss", GuidedClassifierLoss, config=GuidedClassifierLossConfig)
