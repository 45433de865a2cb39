"""Name -> component registries, one per kind, filled by the registration hooks.

A name registered twice is an error naming both plugins; an unknown name is an error
listing what exists and the closest match.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import attrs

from mega.errors import ConfigError, PluginError, did_you_mean
from mega.protocols import missing_members

# kind -> the registration hook that fills it
KINDS = {
    "models": "register_models",
    "tokenizers": "register_tokenizers",
    "datasets": "register_datasets",
    "optimizers": "register_optimizers",
    "lr_schedulers": "register_lr_schedulers",
    "checkpoint_formats": "register_checkpoint_formats",
    "loggers": "register_loggers",
    "hidden_transforms": "register_hidden_transforms",
    "hidden_losses": "register_hidden_losses",
    "tasks": "register_tasks",
    "evaluation_harnesses": "register_evaluation_harnesses",
    "model_converters": "register_model_converters",
    "tokenizer_converters": "register_tokenizer_converters",
}


@attrs.frozen
class Entry:
    name: str
    factory: Callable[..., Any]
    config: Optional[type]
    plugin: str


def built(entry: Entry, proto: type, obj):
    """`obj`, made by `entry`'s factory, checked against the protocol the kernel will use
    it through: a PluginError names the plugin and what is missing, before any step runs."""
    missing = missing_members(obj, proto)
    if missing:
        raise PluginError(f"plugin {entry.plugin!r}: {entry.name!r} built a {type(obj).__name__}, which is not a"
                          f" mega.protocols.{proto.__name__} (missing: {', '.join(missing)})")
    return obj


class Registry:
    """The components of one kind, by name."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: Dict[str, Entry] = {}

    def add(self, name: str, factory: Callable[..., Any], config: Optional[type], plugin: str) -> None:
        if not isinstance(name, str) or not name:
            raise PluginError(f"plugin {plugin!r} registered a {self.kind} entry with an invalid name {name!r}")
        if not callable(factory):
            raise PluginError(f"plugin {plugin!r} registered {self.kind} {name!r} with a factory that is not callable")
        if config is not None and not attrs.has(config):
            raise PluginError(
                f"plugin {plugin!r} registered {self.kind} {name!r} with config={config!r}, which is not an attrs class"
            )
        if name in self._entries:
            other = self._entries[name].plugin
            raise PluginError(f"{self.kind} {name!r} is registered by two plugins: {other!r} and {plugin!r}")
        self._entries[name] = Entry(name, factory, config, plugin)

    @property
    def noun(self) -> str:
        """One entry of this kind, in words: "hidden loss", "lr scheduler"."""
        singular = self.kind[:-2] if self.kind.endswith("sses") else self.kind[:-1]
        return singular.replace("_", " ")

    def get(self, name: str, key: str = "") -> Entry:
        """The entry for `name`; `key` is the dotted config key the name came from."""
        try:
            return self._entries[name]
        except KeyError:
            where = f"{key}: " if key else ""
            known = ", ".join(sorted(self._entries)) or "none"
            raise ConfigError(
                f"{where}unknown {self.noun} {name!r}{did_you_mean(name, self._entries)}"
                f" (available: {known})"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def entries(self) -> list[Entry]:
        return [self._entries[n] for n in self.names()]

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)


@attrs.frozen
class TaskModelFactory:
    """The model entry a task's registration implies: `model.name = "<task>"` builds the
    task from the run's `model` table with the task's registered factory, and the task
    builds the model that trains and evaluates it (`Task.model`), holding that same task
    object (its samples, metrics and predictions)."""

    task: Callable[..., Any]

    def __call__(self, config, tokenizer, plugins):
        return self.task(config).model(tokenizer, plugins)


def add_task_models(models: Registry, tasks: Registry) -> None:
    """Each registered task is also the model of its name (same config class, same plugin):
    one `register_tasks` call declares both. A model registered under a task's name is a
    PluginError naming both plugins."""
    for entry in tasks.entries():
        if entry.name in models:
            other = models.get(entry.name).plugin
            raise PluginError(f"task {entry.name!r} (plugin {entry.plugin!r}) is also registered as a model by plugin "
                              f"{other!r}: a task's model entry follows from its register_tasks call alone; drop the "
                              "register_models entry")
        models.add(entry.name, TaskModelFactory(entry.factory), entry.config, entry.plugin)
