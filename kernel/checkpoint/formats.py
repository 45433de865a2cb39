"""Picking the checkpoint format plugin that reads or writes a file: the one a manifest
names, the importer that recognises another tool's files, the exporter `--to` names.
Formats are plugins (`register_checkpoint_formats`); the abilities checked here are the
protocols of `mega.protocols` (`CheckpointFormat`, `Importer`, `Exporter`)."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional

from mega.errors import CheckpointError, ConfigError
from mega.protocols import Exporter, Importer


def format_of(manifest: dict, plugins, where: str = "manifest.json"):
    """The format plugin that wrote a checkpoint, by its manifest's `format`."""
    return plugins.checkpoint_formats.get(manifest.get("format", "native"), f"{where} format").factory()


IMPORT_HINT = "name one with --from"


def find_importer(source: Path, plugins, name: Optional[str] = None, hint: str = IMPORT_HINT):
    """The checkpoint format that reads `source`: `name` when given, else the first whose
    `can_import(source)` says yes. `hint` ends the error when none does: what the calling
    command offers (`mega import` has --from; `mega evaluate` and `generate` do not)."""
    if name is not None:
        fmt = plugins.checkpoint_formats.get(name, "--from").factory()
        if not isinstance(fmt, Importer):
            raise ConfigError(f"--from {name}: this checkpoint format cannot import (formats that can: {_able(plugins, Importer)})")
        return fmt
    for entry in plugins.checkpoint_formats.entries():
        fmt = entry.factory()
        if isinstance(fmt, Importer) and fmt.can_import(source):
            return fmt
    raise CheckpointError(f"{source}: no checkpoint format recognises it (formats that import: {_able(plugins, Importer)};"
                          f" {hint})")


def find_exporter(name: str, plugins):
    """The format `--to name` names, checked to be able to export."""
    fmt = plugins.checkpoint_formats.get(name, "--to").factory()
    if not isinstance(fmt, Exporter):
        raise ConfigError(f"--to {name}: this checkpoint format cannot export (formats that can: {_able(plugins, Exporter)})")
    return fmt


def _able(plugins, proto) -> str:
    return ", ".join(e.name for e in plugins.checkpoint_formats.entries() if isinstance(e.factory(), proto)) or "none"


def check_options(options: Mapping[str, str], known, fmt: str) -> None:
    """Refuse `--option` keys this format does not know, naming the ones it does."""
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ConfigError(f"--option {', '.join(unknown)}: not an option of the {fmt} format"
                          f" (its options: {', '.join(sorted(known)) or 'none'})")
