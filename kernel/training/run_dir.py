"""The run directory: `exp_manager.exp_dir/<name>/` with the resolved config, run.json
(versions of mega, torch and every plugin), checkpoints/, tensorboard/, metrics.jsonl.

Before anything is written into it, a run directory is checked (`check_run_dir`):

* Re-running into a directory that holds a checkpoint compares the new resolved config
  with the run's `config.toml`, key by dotted key. Changes a resumed run can take (the
  keys in `RESUME_SAFE`: more steps, a new learning-rate schedule, logging, checkpoint
  cadence, devices and the parallel layout) go on with a note; any other change stops with
  a ConfigError listing `key: old -> new`, before config.toml is overwritten or an old
  tokenizer is reused. Start a new run with `exp_manager.name=<new>`, or keep going
  anyway with `exp_manager.resume_ignore_config_changes=true`. A directory with no
  checkpoint (a start that failed before its first save) holds nothing to resume: it
  takes the new config, and what was trained there from the corpus is checked against
  the new inputs (`mega.checkpoint.trained_files`).
* The directory (or the nearest folder that exists above it) must be writable, and so
  must its `checkpoints/` folder when there is one, so a read-only location is reported
  at the start, not at the first checkpoint.
* `lock_run_dir` holds an exclusive lock on `<run_dir>/.lock` (with the holder's PID
  written in it) for the life of the process: a second run into the same directory
  refuses and names the holder.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import platform
import sys
from importlib import metadata
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

import torch

from mega.checkpoint.atomic import atomic_write_text
from mega.checkpoint.store import holds_checkpoint
from mega.config import dump_config
from mega.errors import ConfigError

log = logging.getLogger("mega")

LOCK = ".lock"
CHECKPOINTS = "checkpoints"

# Keys (dotted; a trailing ".*" covers a whole table) that may change between the run that
# wrote a run directory and a run that resumes from it: the checkpoint still loads and
# means the same model, data and tokenizer. The parallel layout reshards on load; the
# global batch size is checked separately (it must stay what it was).
RESUME_SAFE = (
    "trainer.max_steps",
    "trainer.val_check_interval",
    "trainer.limit_val_batches",
    "trainer.log_every_n_steps",
    "trainer.enable_progress_bar",
    "trainer.dist_timeout_s",
    "trainer.max_time",  # when to stop, not what a step computes
    "exp_manager.max_time_per_run",
    "trainer.accelerator",
    "trainer.compile",  # how the same step is executed (speed), not what it computes
    "trainer.devices",
    "trainer.num_nodes",
    "trainer.accumulate_grad_batches",
    "trainer.precision",
    "trainer.gradient_clip_val",
    "model.data.prefetch",
    "model.tensor_model_parallel_size",
    "model.pipeline_model_parallel_size",
    "model.micro_batch_size",
    "model.loss_chunk_size",  # the same loss and gradients, computed a chunk at a time
    "model.attention_backend",  # another kernel for the same attention
    "model.megatron_amp_O2",  # checkpoints of both layouts hold fp32 weights and the same optimizer state
    "model.grad_reduce_bucket_size",  # how the same all-reduce is split (speed)
    "model.optim.use_distributed_optimizer",  # checkpoints hold the same state with or without sharding
    "model.optim.overlap_grad_sync",  # when the same reduction runs (speed)
    "model.optim.overlap_param_sync",
    "model.sequence_parallel",  # the same parameters and loss; the activations split along the sequence
    # activation recomputation: the same ops and random streams, run again in backward
    *(f"{table}.{key}" for table in ("model", "model.encoder", "model.decoder")
      for key in ("activations_checkpoint_granularity", "activations_checkpoint_method",
                  "activations_checkpoint_num_layers", "recompute_modules", "distribute_saved_activations")),
    "model.optim.lr",
    "model.optim.weight_decay",
    "model.optim.sched.*",
    "exp_manager.loggers",
    "exp_manager.create_wandb_logger",
    "exp_manager.wandb_logger_kwargs.*",
    "exp_manager.create_mlflow_logger",
    "exp_manager.mlflow_logger_kwargs.*",
    "exp_manager.checkpoint.every_n_train_steps",
    "exp_manager.checkpoint.keep_last_k",
    "exp_manager.checkpoint.save_last",
    "exp_manager.resume_ignore_config_changes",
    # these two name the run directory itself (the same directory may be spelled differently)
    "exp_manager.exp_dir",
    "exp_manager.name",
)


def run_dir_of(config) -> Path:
    return Path(config.exp_manager.exp_dir).expanduser() / config.exp_manager.name


def _flatten(table: Any, prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    if isinstance(table, dict):
        for key, value in table.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    out[prefix[:-1]] = table
    return out


# Keys whose values may change within a family: names of one optimizer (NeMo's names for
# AdamW with the distributed optimizer on), whose checkpoints are the same state.
RESUME_SAFE_VALUES = {
    "model.optim.name": ({"adamw", "distributed_fused_adam", "mcore_distributed_optim"},),
}


def _safe(key: str, old: Any = None, new: Any = None) -> bool:
    if any(old in family and new in family for family in RESUME_SAFE_VALUES.get(key, ())):
        return True
    return any(key == k or (k.endswith(".*") and key.startswith(k[:-1])) for k in RESUME_SAFE)


def _global_batch(flat: Dict[str, Any]) -> int:
    """The effective global batch size of a flattened config (micro x data-parallel x
    accumulation when global_batch_size is not set)."""
    gbs = flat.get("model.global_batch_size")
    if gbs is not None:
        return int(gbs)
    world = int(flat.get("trainer.devices", 1)) * int(flat.get("trainer.num_nodes", 1))
    model_parallel = int(flat.get("model.tensor_model_parallel_size", 1)) * int(flat.get("model.pipeline_model_parallel_size", 1))
    dp = max(1, world // max(1, model_parallel))
    return int(flat.get("model.micro_batch_size", 1)) * dp * int(flat.get("trainer.accumulate_grad_batches", 1))


def config_changes(old: dict, new: dict) -> List[Tuple[str, Any, Any]]:
    """(dotted key, old, new) for every key whose value differs ("(unset)" for a missing one)."""
    a, b = _flatten(old), _flatten(new)
    missing = "(unset)"
    return [(k, a.get(k, missing), b.get(k, missing)) for k in sorted(set(a) | set(b)) if a.get(k, missing) != b.get(k, missing)]


def check_config_unchanged(config, run_dir: Path) -> None:
    """Compare `config` with the config of the run that wrote `run_dir` (nothing is
    written): safe changes are logged, anything else raises a ConfigError listing them.
    A run directory without a checkpoint takes the new config (with a note)."""
    path = run_dir / "config.toml"
    if not path.is_file():
        return
    checkpointed = holds_checkpoint(run_dir)
    try:
        old = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        if not checkpointed:
            return  # nothing to resume: the new config replaces it
        raise ConfigError(f"{path}: cannot read the config of the run in this directory ({exc}); start a new run"
                          f" with exp_manager.name=<new name>") from None
    new = tomllib.loads(dump_config(config))
    changes = config_changes(old, new)
    if not checkpointed:
        if changes:
            log.info("%s: no checkpoint here, so nothing to resume: the run starts afresh with this config (%s)",
                     run_dir, "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in changes))
        return
    unsafe = [c for c in changes if not _safe(*c)]
    old_gbs, new_gbs = _global_batch(_flatten(old)), _global_batch(_flatten(new))
    if old_gbs != new_gbs:
        unsafe.append(("global batch size (micro_batch_size x data-parallel x accumulate_grad_batches)", old_gbs, new_gbs))
    shown = [f"{k}: {a!r} -> {b!r}" for k, a, b in changes if _safe(k, a, b) and k not in ("exp_manager.exp_dir", "exp_manager.name")]
    if unsafe and not config.exp_manager.resume_ignore_config_changes:
        lines = "\n  ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in unsafe)
        raise ConfigError(
            f"{run_dir}: this run directory holds a run with another config; {len(unsafe)} change(s) cannot be resumed"
            f" safely:\n  {lines}\nStart a new run with exp_manager.name=<new name>, or resume anyway with"
            f" exp_manager.resume_ignore_config_changes=true (a trained tokenizer and the checkpoints are reused as they are)")
    if unsafe:
        log.warning("%s: resuming despite config changes (exp_manager.resume_ignore_config_changes=true): %s", run_dir,
                    "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in unsafe))
    if shown:
        log.info("%s: continuing with changed settings: %s", run_dir, "; ".join(shown))


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(path: Path) -> None:
    """Raise a ConfigError when `path` (or, if it does not exist yet, the folder that will
    hold it) cannot be written: checked with os.access and a probe file, so a read-only
    mount is caught too. `path` is a run directory; its `checkpoints/` folder, when there
    is one, is checked too (a read-only one would otherwise fail at the first save)."""
    path = Path(path)
    _check_writable(path, "choose another exp_manager.exp_dir")
    if (path / CHECKPOINTS).exists():
        _check_writable(path / CHECKPOINTS, "checkpoints could not be saved; make it writable, or start a new run"
                                             " with exp_manager.name=<new name>")


def _check_writable(path: Path, advice: str) -> None:
    target = _nearest_existing(path)
    where = f"{target}" if target == path.absolute() else f"{target} (where {path} would be created)"
    if not target.is_dir():
        raise ConfigError(f"exp_manager.exp_dir: {target} is not a directory, so {path} cannot be created")
    if not os.access(target, os.W_OK | os.X_OK):
        raise ConfigError(f"exp_manager.exp_dir: {where} is not writable; {advice}")
    probe = target / f".mega-write-probe.{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(b"x")
    except OSError as exc:
        what = "no space left on" if exc.errno == errno.ENOSPC else "cannot write to"
        raise ConfigError(f"exp_manager.exp_dir: {what} {where} ({exc.strerror or exc}); {advice}") from None
    finally:
        try:
            probe.unlink()
        except OSError:
            pass


_LOCKS: Dict[Path, int] = {}  # run directory -> the open lock file this process holds


def lock_run_dir(run_dir: Path) -> None:
    """Take `<run_dir>/.lock` for this process (released when it exits, or by
    `unlock_run_dir`). A second process running into the same directory gets a
    ConfigError naming the holder's PID. Re-entrant within one process."""
    import fcntl

    key = Path(run_dir).absolute()
    if key in _LOCKS:
        return
    path = key / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            os.close(fd)
            raise
        try:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
        finally:
            os.close(fd)
        raise ConfigError(f"{run_dir}: another run is using this run directory (PID {holder}, lock {path}); wait for it"
                          f" to finish or start a new run with exp_manager.name=<new name>") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _LOCKS[key] = fd


def unlock_run_dir(run_dir: Path) -> None:
    fd = _LOCKS.pop(Path(run_dir).absolute(), None)
    if fd is not None:
        os.close(fd)  # closing the descriptor releases the flock


def prepare_run_dir(config, plugins, write: bool = True) -> Path:
    """The run directory's path; with `write` (rank 0) also create it and write the
    resolved config and run.json."""
    run_dir = run_dir_of(config)
    if not write:
        return run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.toml", dump_config(config))
    info = {
        "mega": metadata.version("mega-lm"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "command": sys.argv,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "plugins": {name: {"version": p.version, "module": p.module} for name, p in plugins.info.items()},
    }
    atomic_write_text(run_dir / "run.json", json.dumps(info, indent=1))
    return run_dir
