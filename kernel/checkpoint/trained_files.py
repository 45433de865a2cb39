"""Files a plugin trains from the corpus into the run directory (a tokenizer's model or
vocabulary), and whether one found there may be used again.

Each such file gets a stamp beside it, `<file>.json`: what it was trained from (the
corpus files' resolved paths, sizes and modification times) and with which options. A
later start uses the file again only when its stamp matches the new inputs. Otherwise:

* the run directory holds no checkpoint (a start that failed, a run that never saved):
  nothing depends on the file, so it is trained again, with a warning saying why;
* the run directory holds checkpoints: they were trained with the file's ids, so it is
  kept (the warning names what changed); a new vocabulary needs a new run directory.

The stamp is written after the file (both by rename), so a file without a stamp is one
whose origin is unknown: trained again, unless checkpoints depend on it.

A plugin that trains such a file::

    stamp = trained_files.stamp(corpus_files, {"vocab_size": config.vocab_size, ...})
    if not trained_files.reusable(path, stamp, "the sentencepiece tokenizer"):
        train(corpus_files, path)
        trained_files.write_stamp(path, stamp)
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence

log = logging.getLogger("mega")

STAMP_VERSION = 1


def stamp_path(path: Path) -> Path:
    return Path(path).with_name(Path(path).name + ".json")


def stamp(files: Sequence[Path], options: Mapping[str, Any]) -> dict:
    """What a file trained on `files` with `options` came from, as JSON data."""
    entries = []
    for f in files:
        st = Path(f).stat()
        entries.append({"path": str(Path(f).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return json.loads(json.dumps({"version": STAMP_VERSION, "files": entries, "options": dict(options)}))


def _read(path: Path):
    try:
        return json.loads(stamp_path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _difference(old, new: dict) -> str:
    """What changed between two stamps, in a few words."""
    if not isinstance(old, dict):
        return "no record of what it was trained from"
    parts: List[str] = []
    old_files = {e.get("path"): e for e in old.get("files", []) if isinstance(e, dict)}
    new_files = {e["path"]: e for e in new["files"]}
    gone, added = sorted(set(old_files) - set(new_files)), sorted(set(new_files) - set(old_files))
    if gone or added:
        parts.append(f"trained on {', '.join(gone) or 'other files'}, now {', '.join(added) or 'fewer files'}")
    changed = [p for p in sorted(set(old_files) & set(new_files)) if old_files[p] != new_files[p]]
    if changed:
        parts.append(f"{', '.join(changed)} changed since (size or modification time)")
    old_opts: Dict[str, Any] = old.get("options", {}) if isinstance(old.get("options"), dict) else {}
    for key in sorted(set(old_opts) | set(new["options"])):
        if old_opts.get(key) != new["options"].get(key):
            parts.append(f"{key}: {old_opts.get(key, '(unset)')!r} -> {new['options'].get(key, '(unset)')!r}")
    return "; ".join(parts) or "trained by another version of mega"


def reusable(path: Path, new: dict, what: str) -> bool:
    """Whether the trained file at `path` may be used for inputs `new` (a `stamp`).

    False when there is none, or when it came from other inputs and no checkpoint in the
    run directory (`path`'s folder) depends on it: the caller trains it again. A file
    checkpoints depend on is always kept, with a warning when its inputs changed. A caller
    that names no corpus files (`mega preprocess --config`: it reads the run's trained file
    and has nothing to train one from) gets the file as it is."""
    from mega.checkpoint.store import holds_checkpoint

    path = Path(path)
    if not path.is_file():
        return False
    if not new["files"]:
        return True
    old = _read(path)
    if old == new:
        return True
    run_dir = path.parent
    if holds_checkpoint(run_dir):
        if old is not None:  # no stamp: a run directory from before stamps; its config was checked
            log.warning("%s: %s was trained from other inputs (%s); it is kept, since the checkpoints in %s were"
                        " trained with it (start a new run with exp_manager.name=<new name> for a new one)", path,
                        what, _difference(old, new), run_dir / "checkpoints")
        return True
    log.warning("%s: %s here was trained from other inputs (%s) and no checkpoint depends on it: training it again",
                path, what, _difference(old, new))
    return False


def write_stamp(path: Path, new: dict) -> None:
    """Record that the file at `path` was trained from `new` (written after the file)."""
    from mega.checkpoint.atomic import atomic_write_text

    atomic_write_text(stamp_path(path), json.dumps(new, indent=1))
