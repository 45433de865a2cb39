"""mega: Megatron-style language-model training from one TOML file.

Public API for plugin authors and scripts:

* `mega.hookimpl` marks a plugin's hook implementations (see `mega.hookspecs`).
* `mega.load_config(path, overrides)` reads and validates an experiment.
* `mega.run(config)` trains it.
"""
from __future__ import annotations

import pluggy

__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker("mega")


def load_config(path, overrides=(), plugins=None):
    """Load and validate an experiment TOML (see `mega.config.load_config`)."""
    from mega.config import load_config as _load

    return _load(path, overrides, plugins)


def run(config, plugins=None):
    """Train the experiment `config` (an ExperimentConfig); returns the finished Run."""
    from mega.training.run import run as _run

    return _run(config, plugins)


__all__ = ["hookimpl", "load_config", "run", "__version__"]
