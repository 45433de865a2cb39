"""Moving checkpoints between mega and other tools: the kernel's half of `mega import` and
`mega export`. Formats that can read another tool's files (`mega.protocols.Importer`) or
write them (`Exporter`) are plugins; this module picks one and gives importers one way to
write a run directory, so every imported run looks like a trained one: `config.toml`, the
tokenizer files, and a verified checkpoint with a sharding record (so it loads, and
reshards, at any tensor/pipeline size).
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Dict, Mapping, Optional

import torch

from mega.config import ExperimentConfig, config_from_dict, dump_config
from mega.errors import CheckpointError, ConfigError
from mega.protocols import Exporter, Importer
from mega.runtime.parallel import ParallelState
from mega.runtime.sharding import sharding_of
from mega.training.checkpointing import CheckpointManager
from mega.training.run import checkpoint_files

log = logging.getLogger("mega.interop")


def find_importer(source: Path, plugins, name: Optional[str] = None):
    """The checkpoint format that reads `source`: `name` when given, else the first whose
    `can_import(source)` says yes."""
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
                          " name one with --from)")


def find_exporter(name: str, plugins):
    fmt = plugins.checkpoint_formats.get(name, "--to").factory()
    if not isinstance(fmt, Exporter):
        raise ConfigError(f"--to {name}: this checkpoint format cannot export (formats that can: {_able(plugins, Exporter)})")
    return fmt


def _able(plugins, proto) -> str:
    return ", ".join(e.name for e in plugins.checkpoint_formats.entries() if isinstance(e.factory(), proto)) or "none"


def write_imported_run(run_dir: Path, raw_config: dict, model_state: Dict[str, torch.Tensor], plugins,
                       files: Mapping[str, Path] = (), step: int = 0) -> Path:
    """Write a run directory from a converted model.

    `raw_config` is an experiment as a dict (at least its `model` table, with the tokenizer;
    `exp_manager` is set here); `model_state` holds the whole model's tensors under mega's
    names at one process (vocabulary padded as the config pads it); `files` are tokenizer
    files to copy in, by the tokenizer config key that names them. The model is built from
    the config and loaded strictly, so a mapping mistake fails here, not at generation."""
    run_dir = Path(run_dir).expanduser()
    if (run_dir / "checkpoints").exists():
        raise CheckpointError(f"{run_dir}: already holds checkpoints; import into a new directory")
    run_dir.mkdir(parents=True, exist_ok=True)
    tok = raw_config.setdefault("model", {}).setdefault("tokenizer", {})
    for key, path in dict(files).items():
        target = run_dir / Path(path).name
        shutil.copyfile(path, target)
        tok[key] = str(target)
    raw_config["exp_manager"] = {**raw_config.get("exp_manager", {}), "exp_dir": str(run_dir.parent), "name": run_dir.name}
    config: ExperimentConfig = config_from_dict(raw_config, plugins=plugins, source=f"{run_dir} (imported)")
    mc = config.model
    mc.check(plugins)
    tokenizer = plugins.tokenizers.get(mc.tokenizer.library, "model.tokenizer.library").factory(mc.tokenizer, [], run_dir)
    with torch.random.fork_rng(devices=[]):
        model = plugins.models.get(mc.name, "model.name").factory(mc, tokenizer, plugins)
    missing, unexpected = model.load_state_dict(model_state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{run_dir}: the converted weights do not fit model {mc.name!r}"
                              f" (missing: {', '.join(missing) or '-'}; unexpected: {', '.join(unexpected) or '-'})")
    (run_dir / "config.toml").write_text(dump_config(config))
    return save_model_checkpoint(run_dir, config, model, tokenizer, plugins, step)


def save_model_checkpoint(run_dir: Path, config: ExperimentConfig, model: torch.nn.Module, tokenizer, plugins,
                          step: int = 0) -> Path:
    """A native checkpoint of `model` alone (no optimizer: a resumed run starts its moments
    afresh) under `run_dir/checkpoints`, with the config and tokenizer files beside it, as
    the training loop writes them."""
    single = ParallelState()
    extra = checkpoint_files(config, tokenizer)
    fmt = plugins.checkpoint_formats.get("native").factory()
    state = {"model": model.state_dict(), "trainer": {"step": step, "consumed_samples": 0},
             "sharding": sharding_of(model, single)}
    meta = {"consumed_samples": 0, "tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1}
    return CheckpointManager(run_dir / "checkpoints", fmt, keep_last_k=0).save(step, state, extra, meta=meta, parallel=single)
