"""The hiddens builder and NeMo's Python API (`get_registered_hiddens`,
`register_hidden_transform`, `register_hidden_loss`, `get_hiddens_module`) on top of the
`hidden_transforms` / `hidden_losses` registries that mega's hooks fill.

`model.hiddens` is structured by the kernel like any config (strict types, unknown keys
named at their dotted path with a suggestion, `cls_name` resolved through the registry),
so by the time a module is built every entry is an instance of its component's config
class. `get_hiddens_module` also accepts a raw table (NeMo's API) and structures it the
same way first.

Registries: a model builds its module from the plugins of its run (`plugins=`); without
one, the process-wide plugins (`mega.get_plugins()`) are used. The Python
registration functions add to those process-wide registries, so `mega run` / `mega.run`
in the same process see the names; a manager made by `load_plugins()` sees only what hooks
registered.
"""
from __future__ import annotations

import importlib
import inspect
import logging
import typing
from collections.abc import Mapping
from typing import Any, Dict, List, Optional, Union

import attrs

from mega.config import HiddenLossConfig, HiddenTransformConfig, structure_table
from mega.plugins.hiddens.module import HiddensConfig, HiddensModule

log = logging.getLogger("mega.hiddens")
PYTHON_API = "python (register_hidden_*)"  # the plugin name Python registrations are listed under
_INJECTED = {"self", "name", "cls_name", "model_parallel_cfg", "nemo_compat"}  # set by the builder, not by config
_CHECKED = (bool, int, float, str)


def _plugins(plugins):
    if plugins is None:
        import mega

        return mega.get_plugins()
    return plugins


def get_registered_hiddens(plugins=None) -> Dict[str, List[str]]:
    """{"loss": [names], "transform": [names]}."""
    p = _plugins(plugins)
    return {"loss": p.hidden_losses.names(), "transform": p.hidden_transforms.names()}


def register_hidden_transform(cls_name: str, class_path: Union[str, type], config: Optional[type] = None) -> None:
    """Make `cls_name` usable as a transform `cls_name` (a class or a dotted path).
    `config`: its attrs config class (subclassing `mega.config.HiddenTransformConfig`);
    without one, it is derived from the constructor's signature."""
    _register("hidden_transforms", cls_name, class_path, config, HiddenTransformConfig)


def register_hidden_loss(cls_name: str, class_path: Union[str, type], config: Optional[type] = None) -> None:
    """As `register_hidden_transform`, for a loss (`mega.config.HiddenLossConfig`)."""
    _register("hidden_losses", cls_name, class_path, config, HiddenLossConfig)


def _register(kind: str, cls_name: str, class_path: Union[str, type], config: Optional[type], base: type) -> None:
    registry = _plugins(None).registries[kind]
    if cls_name in registry:
        raise ValueError(f"Cannot register duplicate {registry.noun} ({cls_name})")
    cls = _resolve(class_path)
    registry.add(cls_name, cls, config or config_from_signature(cls, base), PYTHON_API)
    log.info("Registered %s %s at %s", registry.noun, cls_name, class_path)


def _resolve(target):
    if isinstance(target, str):
        module, _, attr = target.rpartition(".")
        return getattr(importlib.import_module(module), attr)
    return target


def config_from_signature(cls, base: type) -> type:
    """A config class for a component registered without one: `base` plus one field per
    named constructor parameter, with its default. Parameters annotated bool, int, float or
    str (or Optional of one) are type-checked; others take any TOML value."""
    try:
        hints = typing.get_type_hints(cls.__init__ if isinstance(cls, type) else cls)
    except Exception:
        hints = {}
    own = {a.name for a in attrs.fields(base)}
    fields = {}
    for p in inspect.signature(cls).parameters.values():
        if p.name in own or p.name in _INJECTED or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        t = hints.get(p.name, Any)
        if not (t in _CHECKED or (typing.get_origin(t) is Union and all(a in _CHECKED or a is type(None) for a in typing.get_args(t)))):
            t = Any
        fields[p.name] = attrs.field(default=attrs.NOTHING if p.default is p.empty else p.default, type=t)
    return attrs.make_class(f"{getattr(cls, '__name__', 'Component')}Config", fields, bases=(base,), kw_only=True)


def _plain(value):
    """Nested mappings and sequences (e.g. an OmegaConf DictConfig) as dicts and lists."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _entries(section) -> List[tuple]:
    """(name, config) in order from a table or an array of tables."""
    tables = section if isinstance(section, list) else [section]
    return [(name, cfg) for table in tables for name, cfg in table.items()]


def _build(registry, section, inject: dict, where: str) -> list:
    built = []
    for key, cfg in _entries(section):
        cls = registry.get(cfg.cls_name, f"{where}.{key}.cls_name").factory
        kwargs = {a.name: getattr(cfg, a.name) for a in attrs.fields(type(cfg)) if a.name not in ("cls_name", "name")}
        kwargs["name"] = key if cfg.name is None else cfg.name
        accepted = inspect.signature(cls).parameters
        kwargs.update({k: v for k, v in inject.items() if k in accepted})
        try:
            built.append(cls(**kwargs))
        except Exception:
            log.error("Failed to build %s %s with cfg=%s", registry.noun, key, cfg)
            raise
    return built


def get_hiddens_module(cfg: Union[HiddensConfig, Mapping, None] = None, model_parallel_cfg=None,
                       plugins=None) -> Optional[HiddensModule]:
    """Build the module from `model.hiddens` (a `HiddensConfig`, or a raw table that is
    structured first: a problem in it is a ConfigError naming its `model.hiddens...` key),
    or None when there is none. Components come from `plugins`' registries (default: the
    process-wide plugins).

    `nemo_compat = true` reproduces NeMo exactly: tokens_loss_weight is ignored (1.0) and
    every component whose constructor has the option gets `nemo_compat=True`."""
    if not cfg:
        return None
    plugins = _plugins(plugins)
    if not isinstance(cfg, HiddensConfig):
        cfg = structure_table(_plain(cfg), HiddensConfig, plugins, path="model.hiddens")
    if cfg == HiddensConfig():  # an empty [model.hiddens] table: no module, as when absent
        return None
    inject = {"nemo_compat": cfg.nemo_compat}
    transforms = _build(plugins.hidden_transforms, cfg.transform, {**inject, "model_parallel_cfg": model_parallel_cfg},
                        "model.hiddens.transform")
    losses = _build(plugins.hidden_losses, cfg.loss, inject, "model.hiddens.loss")
    return HiddensModule(transforms, losses, enc_output_name=cfg.enc_output_name,
                         tokens_loss_weight=1.0 if cfg.nemo_compat else cfg.tokens_loss_weight)
