"""The `archive` checkpoint format: a whole checkpoint in one file, mega's `.nemo`.

    mega export RUN model.mega                    write one (--to archive for other names,
                                                  or mega.save_to(RUN, "model.mega"))
    mega generate model.mega --prompt ...         sample from it directly (or mega.restore_from)
    mega import model.mega RUN_DIR                unpack it into a run directory to train on

The file is an uncompressed tar (weights do not compress) whose members are a checkpoint
directory of this format:

    manifest.json            first member: mega version, archive format version, step,
                             tensor/pipeline-parallel sizes, size and sha256 of every member
    config.toml              the resolved experiment; its tokenizer keys name the members below
    tokenizer.*              the tokenizer's files
    model_weights.ckpt       the model's state dict (plain tensors, read with weights_only=True)
    sharding.json            its sharding record (mega.runtime.sharding), so it reshards
    mp_rank_XX[_YYY]/...     the same two files per model-parallel rank when TP/PP > 1

The manifest has the kernel's checkpoint-manifest schema, so an unpacked archive is a
checkpoint directory that `verify` checks and `load_resharded` loads at any TP/PP size.
Unpacking checks every member against the manifest and refuses, by member name, anything
missing, altered, unlisted, or not a plain file with a relative path.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import tempfile
import time
from pathlib import Path, PurePosixPath
from typing import Dict, Mapping

import torch

import mega
from mega.checkpoint import MANIFEST, atomic_path, check_options, resolve_checkpoint, verify
from mega.config import load_raw
from mega.errors import CheckpointError, ConfigError
from mega.checkpoint.load_errors import describe
from mega.plugins.checkpoints.native import rank_folder
from mega.runtime.parallel import ParallelState

FORMAT_VERSION = 1
WEIGHTS = "model_weights.ckpt"
SHARDING = "sharding.json"
SUFFIX = ".mega"


def tokenizer_files(checkpoint: Path, raw_config: dict) -> Dict[str, Path]:
    """The tokenizer files a checkpoint holds, by the tokenizer config key naming them
    (paths leading outside the checkpoint refused: mega.checkpoint.checkpoint_tokenizer_files)."""
    from mega.checkpoint import checkpoint_tokenizer_files

    return checkpoint_tokenizer_files(checkpoint, raw_config.get("model", {}).get("tokenizer", {}))


class ArchiveFormat:
    name = "archive"

    # --- CheckpointFormat: one rank's files of an unpacked archive ---------------------------
    def save(self, state: dict, directory: Path, parallel=None) -> None:
        if state.get("optimizer") is not None:
            raise CheckpointError("exp_manager.checkpoint.format='archive' holds model weights only; train with 'native'"
                                  " and write an archive with `mega export RUN model.mega`")
        folder = rank_folder(Path(directory), parallel)
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(_compact(state["model"]), folder / WEIGHTS)
        (folder / SHARDING).write_text(json.dumps(state["sharding"]))

    def load(self, directory: Path, parallel=None, parts=("model", "sharding")) -> dict:
        folder = rank_folder(Path(directory), parallel)
        path = folder / WEIGHTS
        if not path.is_file():
            raise CheckpointError(f"{path}: missing from the archive")
        try:
            state = {"model": torch.load(path, map_location="cpu", weights_only=True)}
            if (folder / SHARDING).is_file():
                state["sharding"] = json.loads((folder / SHARDING).read_text())
        except Exception as exc:
            raise CheckpointError(f"{path}: cannot be read: {describe(exc)}") from None
        return state

    # --- Exporter ------------------------------------------------------------------------------
    def export_run(self, checkpoint: Path, destination: Path, options: Mapping[str, str], plugins) -> Path:
        check_options(options, (), self.name)
        checkpoint = resolve_checkpoint(checkpoint)
        manifest = verify(checkpoint)
        destination = Path(destination).expanduser()
        if destination.is_dir():
            raise ConfigError(f"{destination}: is a directory; give the archive's file name (e.g. model{SUFFIX})")
        source = plugins.checkpoint_formats.get(manifest.get("format", "native"), "the checkpoint's format").factory()
        tp, pp = manifest.get("tensor_model_parallel_size", 1), manifest.get("pipeline_model_parallel_size", 1)
        raw = load_raw(checkpoint / "config.toml")
        small = {"config.toml": (checkpoint / "config.toml").read_bytes()}
        for path in tokenizer_files(checkpoint, raw).values():
            small[path.name] = path.read_bytes()
        ranks = [ParallelState(tp_size=tp, tp_rank=t, pp_size=pp, pp_rank=p) for p in range(pp) for t in range(tp)]
        names = [_member(rank_folder(Path("."), r) / WEIGHTS) for r in ranks]
        meta = {"step": manifest.get("step", 0), "format": self.name, "mega_version": mega.__version__,
                "archive_format_version": FORMAT_VERSION, "source_format": source.name,
                "tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp,
                "consumed_samples": manifest.get("consumed_samples", 0)}
        destination.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(destination) as tmp:  # whatever was at `destination` stays until the archive is whole
            _write(tmp, meta, small, names, lambda i: self._rank(source, checkpoint, ranks[i]))
        return destination

    def _rank(self, source, checkpoint: Path, parallel: ParallelState):
        state = source.load(checkpoint, parallel, parts=("model", "sharding"))
        if state.get("sharding") is None:
            raise CheckpointError(f"{checkpoint}: has no sharding record for rank {rank_folder(Path('.'), parallel)};"
                                  " an archive must be loadable at any parallel layout")
        return _compact(state["model"]), json.dumps(state["sharding"]).encode()

    # --- Importer ------------------------------------------------------------------------------
    def can_import(self, source: Path) -> bool:
        """A `.mega` file, or any tar whose first member is a manifest (one header read)."""
        source = Path(source)
        if not source.is_file():
            return False
        if source.suffix == SUFFIX:
            return True
        try:
            with tarfile.open(source, "r:") as tar:
                first = tar.next()
        except (tarfile.TarError, OSError):
            return False
        return first is not None and first.name.removeprefix("./") == MANIFEST

    def unpack(self, source: Path, directory: Path) -> Path:
        """Unpack the archive `source` into `directory` (a new checkpoint directory), checking
        every member against the manifest; return the directory."""
        return unpack(Path(source), Path(directory))

    def import_run(self, source: Path, run_dir: Path, options: Mapping[str, str], plugins) -> Path:
        check_options(options, (), self.name)
        from mega.checkpoint import restore
        from mega.checkpoint import write_imported_run

        with tempfile.TemporaryDirectory(prefix="mega-unpack-") as tmp:
            ckpt = unpack(Path(source), Path(tmp) / "checkpoint")
            step = json.loads((ckpt / MANIFEST).read_text()).get("step", 0)
            model, _, _ = restore(ckpt, plugins)  # resharded to this process: one rank
            raw = load_raw(ckpt / "config.toml")
            return write_imported_run(run_dir, raw, model.state_dict(), plugins, files=tokenizer_files(ckpt, raw), step=step)


def _compact(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """torch.save writes a view's whole storage: copy the tensors that are views of more."""
    return {k: v.clone() if torch.is_tensor(v) and v.untyped_storage().nbytes() != v.nbytes else v
            for k, v in state.items()}


def _member(path: Path) -> str:
    return PurePosixPath(*Path(path).parts).as_posix()


def _info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o644, int(time.time())
    return info


def _write(path: Path, meta: dict, small: Dict[str, bytes], weight_names, weights) -> None:
    """Write the tar: the manifest first (with room reserved, rewritten in place once the
    weights' checksums are known), then config and tokenizer, then per rank its sharding
    record and weights (one rank in memory at a time)."""
    files = {n: {"size": len(b), "sha256": hashlib.sha256(b).hexdigest()} for n, b in small.items()}
    for n in weight_names:
        files[_member(Path(n).parent / SHARDING)] = {"size": 10 ** 15, "sha256": "0" * 64}
        files[n] = {"size": 10 ** 15, "sha256": "0" * 64}
    room = -(-len(json.dumps({**meta, "files": files}, indent=1)) // 512) * 512  # an upper bound: sizes < 1 PB
    with path.open("wb") as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
            tar.addfile(_info(MANIFEST, room), io.BytesIO(b" " * room))
            manifest_at = tar.offset - room
            for name, data in small.items():
                tar.addfile(_info(name, len(data)), io.BytesIO(data))
            for i, name in enumerate(weight_names):
                model, sharding = weights(i)
                buf = io.BytesIO()
                torch.save(model, buf)
                del model
                for member, data in ((_member(Path(name).parent / SHARDING), sharding), (name, buf.getbuffer())):
                    files[member] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                    tar.addfile(_info(member, len(data)), io.BytesIO(data))
        text = json.dumps({**meta, "files": files}, indent=1).encode()
        f.seek(manifest_at)
        f.write(text.ljust(room))  # JSON allows the trailing spaces
        f.flush()
        os.fsync(f.fileno())


def safe_members(tar: tarfile.TarFile, source=None) -> Dict[str, tarfile.TarInfo]:
    """A tar's file members by name (normalised: `./a` is `a`; directories skipped), read
    through to the end; refuses, naming the member, one that is not a plain file (a link,
    a device), has an absolute name or a `..` part, or repeats a name, and a truncated or
    damaged archive. Nothing is extracted: callers read members with `tar.extractfile`."""
    source = source if source is not None else tar.name
    members: Dict[str, tarfile.TarInfo] = {}
    name = None
    try:
        for m in tar:
            name = m.name
            if m.isdir():
                continue
            if not m.isfile():
                raise CheckpointError(f"{source}: member {name} is not a plain file; refusing the archive")
            p = PurePosixPath(name)
            name = p.as_posix()  # "./a", "a//b" and "a/./b" are "a", "a/b": one name each
            if p.is_absolute() or ".." in p.parts or name == "." or name in members:
                raise CheckpointError(f"{source}: member {name}: absolute, outside the archive or repeated; refusing it")
            members[name] = m
    except tarfile.TarError as exc:  # a member's data runs past the end, or the next header is damaged
        where = f"member {name} cannot be read (truncated or damaged archive: {exc})" if name else f"damaged archive ({exc})"
        raise CheckpointError(f"{source}: {where}") from None
    return members


def unpack(source: Path, directory: Path) -> Path:
    """See ArchiveFormat.unpack."""
    try:
        tar = tarfile.open(source, "r:")
    except (tarfile.TarError, OSError) as exc:
        raise CheckpointError(f"{source}: not a mega archive ({exc})") from None
    with tar:
        members = safe_members(tar, source)
        if MANIFEST not in members:
            raise CheckpointError(f"{source}: has no {MANIFEST}; not an archive written by `mega export ... --to archive`")
        try:
            manifest = json.loads(tar.extractfile(members[MANIFEST]).read())
            files = manifest["files"]
        except (ValueError, KeyError, TypeError, tarfile.TarError) as exc:
            raise CheckpointError(f"{source}: member {MANIFEST} is unreadable ({exc})") from None
        version = manifest.get("archive_format_version", 0)
        if version > FORMAT_VERSION:
            raise CheckpointError(f"{source}: archive format version {version} was written by a newer mega"
                                  f" ({manifest.get('mega_version')}); this one ({mega.__version__}) reads up to {FORMAT_VERSION}")
        for name in members:
            if name != MANIFEST and name not in files:
                raise CheckpointError(f"{source}: member {name} is not listed in the archive's manifest")
        directory.mkdir(parents=True)
        for name, info in files.items():
            if name not in members:
                raise CheckpointError(f"{source}: member {name} is missing (truncated or damaged archive)")
            target = directory / name
            target.parent.mkdir(parents=True, exist_ok=True)
            h, size = hashlib.sha256(), 0
            try:
                with tar.extractfile(members[name]) as src, target.open("wb") as out:
                    for block in iter(lambda: src.read(1 << 20), b""):
                        h.update(block)
                        size += len(block)
                        out.write(block)
            except (tarfile.TarError, OSError, EOFError) as exc:
                raise CheckpointError(f"{source}: member {name} cannot be read ({exc})") from None
            if size != info["size"] or h.hexdigest() != info["sha256"]:
                raise CheckpointError(f"{source}: member {name} is corrupt (its sha256 does not match the manifest)")
        (directory / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return directory


@mega.hookimpl
def register_checkpoint_formats(register):
    register("archive", ArchiveFormat)
