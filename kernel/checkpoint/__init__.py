"""The checkpoint floor: storing checkpoints and opening them again, below training and
the commands, and part of the plugin API (`docs/plugins.md`).

* the store (`mega.checkpoint.store`): a checkpoint directory per step, written
  atomically with a manifest of sizes and checksums, the `latest` pointer written last,
  keep-last-k pruning; `verify` and `resolve_checkpoint`.
* `restore(path)`: the one way to open any checkpoint or run directory, at any parallel
  layout: (model, tokenizer, config), the model checked against its protocol
  (`mega.checkpoint.restore`). Its lower half, `open_checkpoint` + `load_state`, is what
  resuming a training run uses.
* atomic file writes for every writer (`mega.checkpoint.atomic`).
* what travels with a checkpoint: the config and tokenizer files (`mega.checkpoint.files`).
* resharding a state saved at another tensor/pipeline size (`mega.checkpoint.reshard`).
* the format plugin for a manifest, an importer or an exporter (`mega.checkpoint.formats`).
* writing a run directory from converted weights (`mega.checkpoint.imported`).
"""
from __future__ import annotations

from mega.checkpoint.atomic import atomic_directory, atomic_path, atomic_write_bytes, atomic_write_text
from mega.checkpoint.files import checkpoint_files, checkpoint_tokenizer, checkpoint_tokenizer_files
from mega.checkpoint.formats import check_options, find_exporter, find_importer, format_of
from mega.checkpoint.imported import save_model_checkpoint, write_imported_run
from mega.checkpoint.reshard import load_resharded, optimizer_param_names
from mega.checkpoint.restore import Opened, Restored, build_model, load_state, open_checkpoint, restore, unpack_checkpoint_file
from mega.checkpoint.store import LATEST, MANIFEST, CheckpointManager, resolve_checkpoint, step_of, verify

__all__ = [
    "LATEST", "MANIFEST", "CheckpointManager", "Opened", "Restored", "atomic_directory", "atomic_path",
    "atomic_write_bytes", "atomic_write_text", "build_model", "check_options", "checkpoint_files",
    "checkpoint_tokenizer", "checkpoint_tokenizer_files", "find_exporter", "find_importer", "format_of",
    "load_resharded", "load_state", "open_checkpoint", "optimizer_param_names", "resolve_checkpoint", "restore",
    "save_model_checkpoint", "step_of", "unpack_checkpoint_file", "verify", "write_imported_run",
]
