"""The `torchscript` export: `mega export RUN model.pt --torchscript` (or `--to torchscript`)
writes a model's scripted inference module, which `torch.jit.load` opens in a process
without mega (a serving stack, C++ through libtorch).

A model offers one by a `to_torchscript(**options)` method returning a scripted module
(Transformer-XL: tokens and memory in, log-probabilities and the new memory out). The
file also holds the checkpoint's `config.toml` (`torch.jit.load(path, _extra_files=...)`).
Options (`--option key=value`) go to the model: Transformer-XL takes mem_len, clamp_len and
same_length (default: its eval_* settings). This format only exports: a scripted module
is not a training checkpoint.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

import mega
from mega.checkpoint import atomic_path
from mega.errors import CheckpointError, ConfigError


def _value(text: str):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    try:
        return int(text)
    except ValueError:
        return float(text)


class TorchScriptFormat:
    name = "torchscript"

    def save(self, state: dict, directory: Path, parallel=None) -> None:
        raise CheckpointError("exp_manager.checkpoint.format=torchscript: a scripted module is for inference; train"
                              " with another format and export with `mega export RUN model.pt --torchscript`")

    def load(self, directory: Path, parallel=None, parts=("model",)) -> dict:
        raise CheckpointError(f"{directory}: a TorchScript file is not a mega checkpoint; open it with torch.jit.load")

    def export_run(self, checkpoint: Path, destination: Path, options: Mapping[str, str], plugins) -> Path:
        from mega.checkpoint import restore
        from mega.checkpoint import resolve_checkpoint

        checkpoint = resolve_checkpoint(checkpoint)
        destination = Path(destination).expanduser()
        if destination.is_dir():
            raise ConfigError(f"{destination}: is a directory; give the file name (e.g. model.pt)")
        model, _, config = restore(checkpoint, plugins)
        if not hasattr(model, "to_torchscript"):
            raise ConfigError(f"--torchscript: model {config.model.name!r} has no TorchScript inference module"
                              " (a model offers one with a to_torchscript() method)")
        try:
            scripted = model.to_torchscript(**{k: _value(v) for k, v in options.items()})
        except TypeError as exc:
            raise ConfigError(f"--option: {exc}") from None
        destination.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(destination) as tmp:
            torch.jit.save(scripted, str(tmp), _extra_files={"config.toml": (checkpoint / "config.toml").read_bytes()})
        return destination


@mega.hookimpl
def register_checkpoint_formats(register):
    register("torchscript", TorchScriptFormat)
