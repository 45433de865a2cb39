"""Loads plugins from the `mega.plugins` entry-point group and fills the registries.

Named `plugin_manager` rather than `plugins` because `mega.plugins` is the package of
first-party plugins.

We loop over entry points ourselves instead of calling pluggy's
`load_setuptools_entrypoints`, which stops at the first broken plugin without naming it.
`MEGA_PLUGINS=a,b` restricts which entry points load (by entry-point name); an empty value
loads none. `MEGA_PLUGIN_MODULES=pkg.mod,other` also loads importable modules that are not
installed as entry points (as PYTEST_PLUGINS does) — handy for a project-local callback,
and it reaches every launched worker process.
"""
from __future__ import annotations

import functools
import importlib
import importlib.metadata
import os
from typing import Dict, Iterable, Optional

import attrs
import pluggy

from mega import hookspecs
from mega.errors import PluginError, did_you_mean
from mega.registry import KINDS, Registry

ENTRY_POINT_GROUP = "mega.plugins"


@attrs.define
class PluginInfo:
    name: str
    version: Optional[str]
    module: str
    hooks: list = attrs.field(factory=list)
    components: Dict[str, list] = attrs.field(factory=dict)


class Plugins:
    """The plugin manager plus the registries its registration hooks filled."""

    def __init__(self, pm: pluggy.PluginManager, registries: Dict[str, Registry], info: Dict[str, PluginInfo]):
        self.pm = pm
        self.hook = pm.hook
        self.registries = registries
        self.info = info

    def __getattr__(self, kind: str) -> Registry:
        try:
            return self.__dict__["registries"][kind]
        except KeyError:
            raise AttributeError(kind) from None


def _entry_points() -> list:
    return list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))


def _selected(eps: list, only: Optional[str]) -> list:
    if only is None:
        return eps
    wanted = [n.strip() for n in only.split(",") if n.strip()]
    names = {ep.name for ep in eps}
    for w in wanted:
        if w not in names:
            raise PluginError(
                f"MEGA_PLUGINS names {w!r}, which is not an installed plugin{did_you_mean(w, names)}"
                f" (installed: {', '.join(sorted(names)) or 'none'})"
            )
    return [ep for ep in eps if ep.name in wanted]


def load_plugins(extra: Iterable[object] = (), only: Optional[str] = None, entry_points: bool = True) -> Plugins:
    """Load the installed plugins (plus `extra` objects/modules, used by tests) and fill
    every registry.

    `only` defaults to the `MEGA_PLUGINS` environment variable.
    """
    pm = pluggy.PluginManager("mega")
    pm.add_hookspecs(hookspecs)
    info: Dict[str, PluginInfo] = {}
    if only is None:
        only = os.environ.get("MEGA_PLUGINS")
    if entry_points:
        for ep in _selected(_entry_points(), only):
            try:
                module = ep.load()
            except Exception as exc:  # report which plugin, never drop it silently
                dist = f" (from {ep.dist.name})" if ep.dist else ""
                raise PluginError(f"plugin {ep.name!r}{dist} failed to import {ep.value!r}: {type(exc).__name__}: {exc}") from exc
            if pm.is_registered(module):
                continue
            pm.register(module, name=ep.name)
            info[ep.name] = PluginInfo(ep.name, ep.dist.version if ep.dist else None, ep.value)
    for module_name in filter(None, (m.strip() for m in os.environ.get("MEGA_PLUGIN_MODULES", "").split(","))):
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:
            raise PluginError(f"MEGA_PLUGIN_MODULES: plugin module {module_name!r} failed to import: {type(exc).__name__}: {exc}") from exc
        pm.register(module, name=module_name)
        info[module_name] = PluginInfo(module_name, getattr(module, "__version__", None), module_name)
    for obj in extra:
        name = getattr(obj, "__name__", None) or type(obj).__name__
        pm.register(obj, name=name)
        info[name] = PluginInfo(name, None, name)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        name = pm.get_name(exc.plugin) or repr(exc.plugin)
        raise PluginError(f"plugin {name!r} implements an unknown hook: {exc}") from exc
    for name in info:
        plugin = pm.get_plugin(name)
        info[name].hooks = sorted(h.name for h in pm.get_hookcallers(plugin) or [])

    registries = {kind: Registry(kind) for kind in KINDS}
    for kind, hook_name in KINDS.items():
        # Each plugin is called on its own so the registry knows who registered what.
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            register = functools.partial(_register, registries[kind], impl.plugin_name, info, kind)
            try:
                impl.function(register=register)
            except PluginError:
                raise
            except Exception as exc:
                raise PluginError(f"plugin {impl.plugin_name!r} failed in {hook_name}: {type(exc).__name__}: {exc}") from exc
    return Plugins(pm, registries, info)


def _register(registry: Registry, plugin: str, info: Dict[str, PluginInfo], kind: str, name, factory, config=None):
    registry.add(name, factory, config, plugin)
    if plugin in info:
        info[plugin].components.setdefault(kind, []).append(name)


@functools.lru_cache(maxsize=None)
def _cached_default() -> Plugins:
    return load_plugins()


def get_plugins(fresh: bool = False) -> Plugins:
    """The process-wide plugins (loaded once). `fresh=True` reloads, honouring a changed
    MEGA_PLUGINS."""
    if fresh:
        _cached_default.cache_clear()
    return _cached_default()
