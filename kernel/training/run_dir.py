"""The run directory: `exp_manager.exp_dir/<name>/` with the resolved config, run.json
(versions of mega, torch and every plugin), checkpoints/, tensorboard/, metrics.jsonl."""
from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import torch

import mega
from mega.config import dump_config
from mega.training.checkpointing import write_text_atomic


def prepare_run_dir(config, plugins, write: bool = True) -> Path:
    """The run directory's path; with `write` (rank 0) also create it and write the
    resolved config and run.json."""
    run_dir = Path(config.exp_manager.exp_dir).expanduser() / config.exp_manager.name
    if not write:
        return run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "config.toml", dump_config(config))
    info = {
        "mega": mega.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "command": sys.argv,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "plugins": {name: {"version": p.version, "module": p.module} for name, p in plugins.info.items()},
    }
    write_text_atomic(run_dir / "run.json", json.dumps(info, indent=1))
    return run_dir
