"""mega: Megatron-style language-model training from one TOML file.

Public API for plugin authors and scripts:

* `mega.hookimpl` marks a plugin's hook implementations (see `mega.hookspecs`).
* `mega.load_config(path, overrides)` reads and validates an experiment.
* `mega.run(config)` trains it.
* `mega.save_to(run_or_checkpoint, "model.mega")` packs a checkpoint into one file, and
  `mega.restore_from("model.mega")` returns its (model, tokenizer, config), like NeMo's.
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


def restore_from(path, plugins=None, device: str = "cpu"):
    """(model in eval mode, tokenizer, config) from an archive (`save_to`), a checkpoint
    directory or a run directory, resharded to this process's parallel layout."""
    from mega.inference import load_checkpoint_for_inference

    return load_checkpoint_for_inference(path, plugins, device)


def save_to(checkpoint, path, plugins=None):
    """Write the checkpoint `checkpoint` (a checkpoint directory, a checkpoints folder or a
    run directory: its latest) as one archive file at `path` (`mega export ... --to
    archive`); returns the path."""
    from pathlib import Path

    from mega.interop import find_exporter

    if plugins is None:
        from mega.plugin_manager import get_plugins

        plugins = get_plugins()
    return find_exporter("archive", plugins).export_run(Path(checkpoint), Path(path), {}, plugins)


__all__ = ["hookimpl", "load_config", "run", "restore_from", "save_to", "__version__"]
