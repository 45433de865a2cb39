"""The hiddens registry and builder: NeMo's Python API (`get_registered_hiddens`,
`register_hidden_transform`, `register_hidden_loss`, `get_hiddens_module`) on top of
mega's `register_hidden_transforms` / `register_hidden_losses` hooks.

Names registered by installed plugins (through the hooks) and names registered at run
time from Python live side by side; registering an existing name is an error either way.
Config sections are a table `{name: {cls_name, ...kwargs}}` or an ordered array of such
tables; order is kept.
"""
from __future__ import annotations

import importlib
import inspect
import logging
from typing import Dict, List, Optional, Union

from mega.plugins.hiddens.module import HiddensModule

log = logging.getLogger("mega.hiddens")
_PY_TRANSFORMS: Dict[str, object] = {}
_PY_LOSSES: Dict[str, object] = {}


def _hook_entries(kind: str, plugins=None) -> Dict[str, object]:
    if plugins is None:
        from mega.plugin_manager import get_plugins

        plugins = get_plugins()
    return {e.name: e.factory for e in plugins.registries[kind].entries()}


def _all(kind: str, extra: Dict[str, object], plugins=None) -> Dict[str, object]:
    return {**_hook_entries(kind, plugins), **extra}


def get_registered_hiddens() -> Dict[str, List[str]]:
    """{"loss": [names], "transform": [names]}."""
    return {"loss": list(_all("hidden_losses", _PY_LOSSES)), "transform": list(_all("hidden_transforms", _PY_TRANSFORMS))}


def _register(kind: str, table: Dict[str, object], cls_name: str, class_path: Union[str, type], label: str) -> None:
    if cls_name in _all(kind, table):
        raise ValueError(f"Cannot register duplicate hidden {label} ({cls_name})")
    table[cls_name] = class_path
    log.info("Registered hidden %s %s at %s", label, cls_name, class_path)


def register_hidden_transform(cls_name: str, class_path: Union[str, type]) -> None:
    """Make `cls_name` usable as a transform `cls_name` (a class or a dotted path)."""
    _register("hidden_transforms", _PY_TRANSFORMS, cls_name, class_path, "transform")


def register_hidden_loss(cls_name: str, class_path: Union[str, type]) -> None:
    _register("hidden_losses", _PY_LOSSES, cls_name, class_path, "loss")


def _resolve(target):
    if isinstance(target, str):
        module, _, attr = target.rpartition(".")
        return getattr(importlib.import_module(module), attr)
    return target


def _entries(section) -> List[tuple]:
    """(name, kwargs) in order from a table or an array of tables."""
    if section is None:
        return []
    tables = section if isinstance(section, list) else [section]
    return [(name, dict(cfg)) for table in tables for name, cfg in table.items()]


def _build(kind: str, extra: Dict, label: str, section, inject: dict, where: str, plugins) -> list:
    registry = _all(kind, extra, plugins)
    built = []
    for name, cfg in _entries(section):
        if "cls_name" not in cfg:
            raise KeyError(f"Missing 'cls_name' in hidden {label} {name}" + (f" ({where}.{name})" if where else ""))
        cls_name = cfg.pop("cls_name")
        if cls_name not in registry:
            raise KeyError(f"Unknown hidden {label} {cls_name}, available: {registry.keys()}")
        cfg.setdefault("name", name)
        cls = _resolve(registry[cls_name])
        kwargs = {**cfg, **{k: v for k, v in inject.items() if k in inspect.signature(cls).parameters}}
        try:
            built.append(cls(**kwargs))
        except Exception:
            log.error("Failed to build hidden %s %s with cfg=%s", label, name, cfg)
            raise
    return built


def get_hiddens_module(cfg: Optional[dict] = None, model_parallel_cfg=None, plugins=None) -> Optional[HiddensModule]:
    """Build the module from a `model.hiddens` table, or None when there is none.

    `nemo_compat = true` in the table reproduces NeMo exactly: tokens_loss_weight is
    ignored (1.0) and every component that has the option gets `nemo_compat=True`."""
    if not cfg:
        return None
    cfg = dict(cfg)
    compat = bool(cfg.get("nemo_compat", False))
    inject = {"nemo_compat": compat}
    transforms = _build("hidden_transforms", _PY_TRANSFORMS, "transform", cfg.get("transform"),
                        {**inject, "model_parallel_cfg": model_parallel_cfg}, "model.hiddens.transform", plugins)
    losses = _build("hidden_losses", _PY_LOSSES, "loss", cfg.get("loss"), inject, "model.hiddens.loss", plugins)
    return HiddensModule(transforms, losses, enc_output_name=cfg.get("enc_output_name", "hiddens"),
                         tokens_loss_weight=1.0 if compat else float(cfg.get("tokens_loss_weight", 1.0)))
