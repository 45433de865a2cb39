"""mega: Megatron-style language-model training from one TOML file.

Public API for plugin authors and scripts:

* `mega.hookimpl` marks a plugin's hook implementations (see `mega.hookspecs`).
* `mega.get_plugins()` is every installed plugin, loaded once per process (the registries
  a plugin looks other components up in).
* `mega.load_config(path, overrides)` reads and validates an experiment.
* `mega.run(config)` trains it.
* `mega.save_to(run_or_checkpoint, "model.mega")` packs a checkpoint into one file, and
  `mega.restore_from("model.mega")` returns its (model, tokenizer, config), like NeMo's.
"""
from __future__ import annotations

from importlib import metadata

import pluggy

from mega.environment import check_torch

check_torch()  # a clear error when torch is older than mega-lm needs (mega.environment.MIN_TORCH)
__mega_lm__ = True  # this `mega` is mega-lm's, not PyPI's unrelated `mega` (see mega.environment)

try:  # one source of truth: the installed distribution's metadata (pyproject.toml)
    __version__ = metadata.version("mega-lm")
except metadata.PackageNotFoundError:  # pragma: no cover - the source tree without an install
    __version__ = "0+unknown"

hookimpl = pluggy.HookimplMarker("mega")

# The kernel modules a plugin may import (each with its submodules; "mega" itself means
# the names of this module). Training, the commands and the plugin manager are the
# kernel's own: a plugin that reached into them would break when they change. The rule is
# a test (tests/test_import_rules.py) and is stated in docs/plugins.md.
PLUGIN_API = ("mega", "mega.errors", "mega.protocols", "mega.config", "mega.runtime", "mega.checkpoint", "mega.documents",
              "mega.testing")


def get_plugins():
    """Every installed plugin, loaded once per process (`mega.plugin_manager.Plugins`:
    one registry per kind, e.g. `get_plugins().models.get("gpt")`)."""
    from mega.plugin_manager import get_plugins as _get

    return _get()


def load_config(path, overrides=(), plugins=None):
    """Load and validate an experiment TOML (see `mega.config.load_config`)."""
    from mega.config import load_config as _load

    return _load(path, overrides, plugins)


def run(config, plugins=None):
    """Train the experiment `config` (an ExperimentConfig); returns the finished Run."""
    from mega.training.run import run as _run

    return _run(config, plugins)


def restore_from(path, plugins=None, device: str = "cpu"):
    """(model in eval mode, tokenizer, config) from an archive (`save_to`), a checkpoint
    directory or a run directory, resharded to this process's parallel layout."""
    from mega.checkpoint import restore

    return tuple(restore(path, plugins, device=device))


def save_to(checkpoint, path, plugins=None):
    """Write the checkpoint `checkpoint` (a checkpoint directory, a checkpoints folder or a
    run directory: its latest) as one archive file at `path` (`mega export ... --to
    archive`); returns the path."""
    from pathlib import Path

    from mega.checkpoint import find_exporter

    plugins = plugins if plugins is not None else get_plugins()
    return find_exporter("archive", plugins).export_run(Path(checkpoint), Path(path), {}, plugins)


__all__ = ["PLUGIN_API", "get_plugins", "hookimpl", "load_config", "run", "restore_from", "save_to", "__version__"]
