"""Writing a file so that a reader sees the old content or the new, never a half-written
one: write under a temporary name beside the target, flush it to disk, rename it into
place. Every writer of mega and its first-party plugins that replaces a file goes through
here, so a crash, a full disk or Ctrl-C mid-write never leaves a truncated vocabulary,
index, metrics file or export behind.

* `atomic_write_text(path, text)` / `atomic_write_bytes(path, data)`: a whole file at once.
* `atomic_path(path)`: a context manager yielding a temporary path to give a library that
  writes by file name (`torch.save`, `np.save`, sentencepiece's trainer, `tar`); renamed
  into place when the block ends without an error, removed when it raises.
* `atomic_directory(path)`: the same for a directory (an exported model directory, an
  imported run); an existing non-empty target is refused, never replaced.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator, Union

PathLike = Union[str, "os.PathLike[str]"]


def fsync_dir(path: PathLike) -> None:
    """Make a rename inside `path` durable (best effort: not every filesystem allows it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temporary_name(path: PathLike, suffix: str = "") -> Path:
    """A hidden name beside `path`, unique to this process: `.NAME.tmpPID[suffix]`.
    `suffix` keeps an extension a library insists on (`np.save` appends `.npy`)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp{os.getpid()}{suffix}")


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return path


def atomic_write_text(path: PathLike, text: str, encoding: str = "utf-8") -> Path:
    return atomic_write_bytes(path, text.encode(encoding))


@contextlib.contextmanager
def atomic_path(path: PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block succeeds the file written
    there is flushed and renamed to `path`, when it raises the file is removed."""
    path = Path(path)
    tmp = temporary_name(path, suffix)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_directory(path: PathLike) -> Iterator[Path]:
    """Yield an empty temporary directory beside `path`, renamed to `path` when the block
    succeeds and removed when it raises. `path` must not exist, or be an empty directory
    (it is replaced); anything else is the caller's to refuse first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
