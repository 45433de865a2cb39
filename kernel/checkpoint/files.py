"""The files that travel with every checkpoint besides its weights: the resolved config and
the tokenizer's files, so a checkpoint directory (or an archive of one) stands on its own
and opens on another machine.

On save, the tokenizer's files are copied in as `tokenizer.<name>` and the copy of the
config names them by those relative paths (`checkpoint_files`). On open, the tokenizer
keys that name such a file are pointed back at it (`checkpoint_tokenizer`), and a key that
would lead outside the checkpoint is refused (`checkpoint_tokenizer_files`).
"""
from __future__ import annotations

from pathlib import Path, PurePath
from typing import Any, Dict, Mapping

import attrs

from mega.config import ExperimentConfig, dump_config
from mega.errors import CheckpointError
from mega.protocols import Tokenizer
from mega.registry import built


def checkpoint_files(config: ExperimentConfig, tokenizer: Tokenizer) -> Dict[str, Any]:
    """name -> content (text) or file to copy (Path): the tokenizer's files, and the config
    with its tokenizer keys pointing at those copies."""
    extra: Dict[str, Any] = {}
    for key, path in tokenizer.artifacts().items():
        name = f"tokenizer.{Path(path).name}"
        extra[name] = Path(path)
        config = attrs.evolve(config, model=attrs.evolve(config.model, tokenizer=attrs.evolve(config.model.tokenizer, **{key: name})))
    extra["config.toml"] = dump_config(config)
    return extra


def checkpoint_tokenizer_files(checkpoint: Path, tokenizer: Mapping[str, Any]) -> Dict[str, Path]:
    """The tokenizer files a checkpoint holds, by the tokenizer config key naming them:
    `tokenizer` is its config's `model.tokenizer` table, whose file keys name copies
    beside its config.toml by relative paths (see `checkpoint_files`).

    String values that name no file there are not file keys (a token, the library's name).
    A checkpoint may come from elsewhere (an unpacked archive): a value naming a file by an
    absolute path, through a `..` part, or through a symbolic link out of `checkpoint` is
    refused, naming the key, so loading or importing it never reads a file of this machine."""
    checkpoint = Path(checkpoint)
    root = checkpoint.resolve()
    found: Dict[str, Path] = {}
    for key, value in tokenizer.items():
        if not isinstance(value, str) or not value:
            continue
        rel, path = PurePath(value), checkpoint / value
        try:
            if not path.is_file():
                continue  # not a file name (a token, the library's name)
        except OSError:  # e.g. a value too long to be a file name
            continue
        if rel.is_absolute() or ".." in rel.parts:
            raise CheckpointError(f"{checkpoint / 'config.toml'}: model.tokenizer.{key}={value!r}: a checkpoint's"
                                  " tokenizer files are relative paths inside it; refusing a path that leads outside")
        if not path.resolve().is_relative_to(root):
            raise CheckpointError(f"{checkpoint / 'config.toml'}: model.tokenizer.{key}={value!r} resolves outside"
                                  " the checkpoint (a symbolic link); refusing it")
        found[key] = path
    return found


def checkpoint_tokenizer(config: ExperimentConfig, checkpoint: Path, plugins) -> Tokenizer:
    """The tokenizer a checkpoint was trained with, built from the files beside its config
    (`config.model.tokenizer`'s file keys are pointed at them, in place)."""
    tok_cfg = config.model.tokenizer
    files = checkpoint_tokenizer_files(checkpoint, {a.name: getattr(tok_cfg, a.name) for a in attrs.fields(type(tok_cfg))})
    for key, file in files.items():
        setattr(tok_cfg, key, str(file))
    entry = plugins.tokenizers.get(tok_cfg.library, "model.tokenizer.library")
    return built(entry, Tokenizer, entry.factory(tok_cfg, [], None))
