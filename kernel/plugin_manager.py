"""Loads plugins from the `mega.plugins` entry-point group and fills the registries.

Named `plugin_manager` rather than `plugins` because `mega.plugins` is the package of
first-party plugins.

We loop over entry points ourselves instead of calling pluggy's
`load_setuptools_entrypoints`, which stops at the first broken plugin without naming it.
`MEGA_PLUGINS=a,b` restricts which entry points load (by entry-point name); an empty value
loads none. `MEGA_PLUGIN_MODULES=pkg.mod,other` also loads importable modules that are not
installed as entry points (as PYTEST_PLUGINS does) — handy for a project-local callback,
and it reaches every launched worker process.

An installed plugin that fails to import does not stop the others: it is recorded in
`Plugins.broken` (name -> the error, naming the plugin, its distribution and the exception),
`mega plugins` lists it, other commands warn once, and looking up a name no loaded plugin
registered names the broken plugins that might have provided it. `MEGA_STRICT_PLUGINS=1`
(or `load_plugins(strict=True)`) makes an import failure an error instead. A module named
in MEGA_PLUGIN_MODULES was asked for explicitly: its failure is always an error.
"""
from __future__ import annotations

import functools
import importlib
import importlib.metadata
import logging
import os
import sys
from typing import Dict, Iterable, Optional

import attrs
import pluggy

from mega.environment import check_own_package

check_own_package()  # PyPI's `mega` over mega-lm's __init__.py: one clear error, not a missing mega.hookimpl

from mega import hookspecs
from mega.errors import ConfigError, PluginError, did_you_mean
from mega.registry import KINDS, Registry, add_task_models

ENTRY_POINT_GROUP = "mega.plugins"
STRICT_ENV = "MEGA_STRICT_PLUGINS"
# Set in the environment once the warning about broken plugins was given, so the workers a
# run launches (which inherit it) do not repeat it.
_WARNED_ENV = "MEGA_BROKEN_PLUGINS_WARNED"

log = logging.getLogger("mega")


@attrs.define
class PluginInfo:
    name: str
    version: Optional[str]
    module: str
    hooks: list = attrs.field(factory=list)
    components: Dict[str, list] = attrs.field(factory=dict)


class _Registry(Registry):
    """A registry whose unknown-name error also names the plugins that failed to import
    (one of them may have been meant to provide the name)."""

    def __init__(self, kind: str, broken: Dict[str, str]):
        super().__init__(kind)
        self.broken = broken

    def get(self, name: str, key: str = ""):
        try:
            return super().get(name, key)
        except ConfigError as exc:
            if not self.broken:
                raise
            raise ConfigError(f"{exc}; {_broken_note(self.broken)} and may have provided it") from None


def _broken_note(broken: Dict[str, str]) -> str:
    if len(broken) == 1:
        return f"{next(iter(broken.values()))}"
    return "these plugins failed to import: " + "; ".join(broken.values())


class Plugins:
    """The plugin manager plus the registries its registration hooks filled, and the
    plugins that failed to import (`broken`: name -> error message)."""

    def __init__(self, pm: pluggy.PluginManager, registries: Dict[str, Registry], info: Dict[str, PluginInfo],
                 broken: Optional[Dict[str, str]] = None):
        self.pm = pm
        self.hook = pm.hook
        self.registries = registries
        self.info = info
        self.broken = broken if broken is not None else {}

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


def strict_plugins() -> bool:
    """Whether MEGA_STRICT_PLUGINS asks for an import failure to be an error."""
    return os.environ.get(STRICT_ENV, "").strip().lower() not in ("", "0", "false", "no")


def load_plugins(extra: Iterable[object] = (), only: Optional[str] = None, entry_points: bool = True,
                 strict: Optional[bool] = None) -> Plugins:
    """Load the installed plugins (plus `extra` objects/modules, used by tests) and fill
    every registry.

    `only` defaults to the `MEGA_PLUGINS` environment variable. A plugin that fails to
    import is recorded in `Plugins.broken` and the others load, unless `strict` (default:
    `MEGA_STRICT_PLUGINS`), which raises `PluginError` instead.
    """
    if strict is None:
        strict = strict_plugins()
    pm = pluggy.PluginManager("mega")
    pm.add_hookspecs(hookspecs)
    info: Dict[str, PluginInfo] = {}
    broken: Dict[str, str] = {}

    def failed(name: str, message: str, exc: BaseException) -> None:
        if strict:
            raise PluginError(message) from exc
        broken[name] = message

    if only is None:
        only = os.environ.get("MEGA_PLUGINS")
    if entry_points:
        for ep in _selected(_entry_points(), only):
            try:
                module = ep.load()
            except Exception as exc:  # report which plugin, never drop it silently
                dist = f" (from {ep.dist.name})" if ep.dist else ""
                failed(ep.name, f"plugin {ep.name!r}{dist} failed to import {ep.value!r}: {type(exc).__name__}: {exc}", exc)
                continue
            if pm.is_registered(module):
                continue
            pm.register(module, name=ep.name)
            info[ep.name] = PluginInfo(ep.name, ep.dist.version if ep.dist else None, ep.value)
    for module_name in filter(None, (m.strip() for m in os.environ.get("MEGA_PLUGIN_MODULES", "").split(","))):
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:  # asked for by name in this run's environment: always an error
            raise PluginError(f"MEGA_PLUGIN_MODULES: plugin module {module_name!r} failed to import:"
                              f" {type(exc).__name__}: {exc}") from exc
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

    registries = {kind: _Registry(kind, broken) for kind in KINDS}
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
    add_task_models(registries["models"], registries["tasks"])
    return Plugins(pm, registries, info, broken)


def _register(registry: Registry, plugin: str, info: Dict[str, PluginInfo], kind: str, name, factory, config=None):
    registry.add(name, factory, config, plugin)
    if plugin in info:
        info[plugin].components.setdefault(kind, []).append(name)


@functools.lru_cache(maxsize=None)
def _cached_default() -> Plugins:
    return load_plugins()


def get_plugins(fresh: bool = False, warn: bool = True) -> Plugins:
    """The process-wide plugins (loaded once). `fresh=True` reloads, honouring a changed
    MEGA_PLUGINS. With `warn`, plugins that failed to import are named once on stderr
    (once per process tree: launched workers stay quiet)."""
    if fresh:
        _cached_default.cache_clear()
    plugins = _cached_default()
    if warn:
        warn_broken(plugins)
    return plugins


def warn_broken(plugins: Plugins) -> None:
    """Warn once about the plugins that failed to import; the run goes on without them."""
    if not plugins.broken or os.environ.get(_WARNED_ENV) or os.environ.get("RANK", "0") != "0":
        return
    os.environ[_WARNED_ENV] = "1"
    for message in plugins.broken.values():
        text = (f"warning: {message}; continuing without it (`mega plugins` lists it;"
                f" {STRICT_ENV}=1 makes this an error)")
        if log.handlers:  # the CLI's "[mega] ..." lines
            log.warning(text)
        else:
            print(f"mega: {text}", file=sys.stderr)
