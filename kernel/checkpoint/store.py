"""The checkpoint store: atomic directories, checksums, the `latest` pointer, pruning.

Layout under `<run_dir>/checkpoints/`:

    step_0000100/        one finished checkpoint (files written by the format plugin,
                         plus config.toml, tokenizer files and manifest.json)
    latest               text: the name of the newest good checkpoint, written last

A checkpoint is written into `.tmp-<name>/` (removed first if a crash left one), its
manifest (size and sha256 of every file) written last inside it, then the directory is
renamed into place and only then is `latest` replaced (write temp file, rename). A crash at any point leaves the previous
checkpoint and pointer intact. Loading verifies the manifest, so a truncated or corrupt
file is reported by name; auto-resume falls back to the newest checkpoint that verifies.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Dict, List, Optional, Union

from mega.checkpoint.atomic import atomic_write_text, fsync_dir
from mega.errors import CheckpointError
from mega.protocols import CheckpointFormat, CommitHook, NamesDirectories, SavesOptimizerShards
from mega.runtime.bucket_space import OptimizerShards
from mega.runtime.parallel import ParallelState

log = logging.getLogger("mega.checkpoint")
MANIFEST = "manifest.json"
RUN_CHECKPOINTS = "checkpoints"  # the folder of a run directory that holds its checkpoints
LATEST = "latest"
_STEP_DIR = re.compile(r"^(?:step|iter)_(\d{7,})$")  # "iter_" is Megatron-LM's naming


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# What a full disk looks like through torch.save's C++ stream writer, which loses the errno.
_STREAM_FAILURE = re.compile(r"iostream error|file write failed|unexpected pos|No space left", re.I)
_NEARLY_FULL = 64 << 20  # bytes: a failed stream write with less free than this is a full disk


def _disk_full(exc: BaseException, where: Path) -> bool:
    """Whether a failed write is a full disk: ENOSPC (or EDQUOT), or a C++ stream failure
    (torch.save says only `basic_ios::clear: iostream error`) with next to no space left."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if isinstance(exc, (RuntimeError, OSError)) and _STREAM_FAILURE.search(str(exc)):
        if "no space left" in str(exc).lower():
            return True
        try:
            return shutil.disk_usage(where).free < _NEARLY_FULL
        except OSError:
            return False
    return False


def step_of(path: Path) -> int:
    m = _STEP_DIR.match(path.name)
    if not m:
        raise CheckpointError(f"{path}: not a checkpoint directory (expected step_NNNNNNN or iter_NNNNNNN)")
    return int(m.group(1))


class CheckpointManager:
    def __init__(self, root: Path, fmt: CheckpointFormat, keep_last_k: int = 3):
        self.root = Path(root)
        self.fmt = fmt
        self.keep_last_k = keep_last_k

    # --- saving ---------------------------------------------------------------------------
    def save(self, step: int, state: dict, extra_files: Dict[str, Union[str, Path]], meta: Optional[dict] = None,
             parallel=None) -> Path:
        """Write a checkpoint for `step` (a collective when `parallel` spans several ranks:
        every model-parallel rank of data-parallel replica 0 writes its part — every rank,
        for a format that saves the distributed optimizer's shards — rank 0 adds
        `extra_files` — name -> text (str) or a file to copy (Path) — and the manifest, and
        renames the directory into place)."""
        parallel = parallel or ParallelState()
        named = isinstance(self.fmt, NamesDirectories)  # e.g. Megatron-LM's iter_XXXXXXX
        final = self.root / (self.fmt.directory_name(step) if named else f"step_{step:07d}")
        tmp = self.root / f".tmp-{final.name}"
        if parallel.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        parallel.barrier()
        error: Optional[BaseException] = None
        try:
            if parallel.dp_rank == 0 or self._every_rank_saves(state):
                self.fmt.save(state, tmp, parallel)
        except BaseException as exc:
            error = exc
        # every rank's part is whole on disk before rank 0 lists sizes and hashes in the manifest
        if not parallel.any(error is not None) and parallel.is_main:
            try:
                self._write(tmp, step, extra_files, meta)
            except BaseException as exc:
                error = exc
        if parallel.any(error is not None):
            full = error is not None and _disk_full(error, self.root)  # judged before the partial files are removed
            if parallel.is_main:
                shutil.rmtree(tmp, ignore_errors=True)  # the previous checkpoint stays the latest
            if full:
                kept = self._latest_name()
                raise CheckpointError(
                    f"no space left on {self.root}: the checkpoint of step {step} was not written"
                    f" ({'the previous checkpoint ' + kept + ' is kept' if kept else 'there is no earlier checkpoint'});"
                    f" free some space or move exp_manager.exp_dir, then run the same command again") from error
            raise error or CheckpointError(f"{tmp}: another rank failed to write its part of the checkpoint")
        if parallel.is_main:
            self._commit(tmp, final)
            if isinstance(self.fmt, CommitHook):  # e.g. Megatron's iteration tracker file
                self.fmt.after_commit(self.root, final, step)
        parallel.barrier()
        return final

    def _every_rank_saves(self, state: dict) -> bool:
        """A format that stores the distributed optimizer's shards as each rank holds them."""
        return isinstance(self.fmt, SavesOptimizerShards) and isinstance(state.get("optimizer"), OptimizerShards)

    def _latest_name(self) -> Optional[str]:
        try:
            return (self.root / LATEST).read_text().strip() or None
        except OSError:
            return None

    def _commit(self, tmp: Path, final: Path) -> None:
        if final.exists():  # re-saving a step (e.g. a resumed run that ends where it began)
            old = self.root / f".old-{final.name}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_dir(self.root)
        atomic_write_text(self.root / LATEST, final.name + "\n")
        self._prune(keep=final)

    def _write(self, tmp: Path, step: int, extra_files, meta) -> None:
        for name, content in extra_files.items():
            target = tmp / name
            if isinstance(content, Path):
                shutil.copyfile(content, target)
            else:
                target.write_text(content, encoding="utf-8")
        files = {}
        for p in sorted(tmp.rglob("*")):
            if p.is_file():
                with p.open("rb+") as f:
                    os.fsync(f.fileno())
                files[str(p.relative_to(tmp))] = {"size": p.stat().st_size, "sha256": _sha256(p)}
        manifest = {"step": step, "format": self.fmt.name, "files": files, **(meta or {})}
        atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=1))
        fsync_dir(tmp)

    def _prune(self, keep: Path) -> None:
        if self.keep_last_k <= 0:
            return
        for old in self.checkpoints()[: -self.keep_last_k]:
            if old != keep:
                shutil.rmtree(old, ignore_errors=True)

    # --- finding and loading ----------------------------------------------------------------
    def checkpoints(self) -> List[Path]:
        """Finished checkpoint directories, oldest first."""
        if not self.root.is_dir():
            return []
        return sorted((p for p in self.root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)), key=step_of)

    def latest_good(self) -> Optional[Path]:
        """The checkpoint `latest` names if it verifies, else the newest that does; None if
        there is none. Corrupt ones are reported, never silently used."""
        candidates = self.checkpoints()[::-1]
        pointer = self.root / LATEST
        if pointer.is_file():
            named = self.root / pointer.read_text().strip()
            candidates = [named] + [c for c in candidates if c != named]
        for path in candidates:
            try:
                verify(path)
                return path
            except CheckpointError as exc:
                log.warning("skipping checkpoint: %s", exc)
        return None


def verify(path: Path) -> dict:
    """Check every file of a checkpoint against its manifest; return the manifest."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    mpath = path / MANIFEST
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
    except FileNotFoundError:
        raise CheckpointError(f"{mpath}: missing; the checkpoint is incomplete") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{mpath}: unreadable manifest ({exc})") from None
    for name, info in files.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{f}: missing from the checkpoint")
        size = f.stat().st_size
        if size != info["size"]:
            raise CheckpointError(f"{f}: truncated or altered ({size} bytes, expected {info['size']})")
        if _sha256(f) != info["sha256"]:
            raise CheckpointError(f"{f}: corrupt (sha256 does not match the manifest)")
    return manifest


def holds_checkpoint(run_dir: Path) -> bool:
    """Whether `run_dir/checkpoints/` holds a checkpoint directory (finished or not: a
    corrupt one is reported when resuming, never silently replaced). Without one there is
    nothing to resume, and the run directory belongs to whichever config starts in it."""
    try:
        return any(p.is_dir() and not p.name.startswith(".") for p in (Path(run_dir) / RUN_CHECKPOINTS).iterdir())
    except OSError:
        return False


def resolve_checkpoint(path: Union[str, Path]) -> Path:
    """Accept a checkpoint directory, a checkpoints/ folder or a run directory; follow
    `latest` where there is one."""
    p = Path(path).expanduser()
    if (p / MANIFEST).is_file() or _STEP_DIR.match(p.name):
        return p
    for root in (p, p / "checkpoints"):
        if (root / LATEST).is_file():
            return root / (root / LATEST).read_text().strip()
    raise CheckpointError(f"{p}: not a checkpoint, a checkpoints folder or a run directory with checkpoints")
