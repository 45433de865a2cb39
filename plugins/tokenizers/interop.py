"""What the tokenizers' converters share: reading `mega import --option` values.

The converters themselves sit beside their tokenizers (`*_interop.py`): each declares how
its files map to Hugging Face, Megatron-LM and NeMo (`mega.protocols`), and the checkpoint
formats ask them in turn (`register_tokenizer_converters`)."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

from mega.errors import ConfigError


def option_file(options: Mapping[str, str], key: str) -> Path:
    """The file `--option key=PATH` names; a ConfigError naming the option if there is none."""
    path = Path(options[key]).expanduser()
    if not path.is_file():
        raise ConfigError(f"--option {key}={path}: no such file")
    return path


def parse_bool(value: str, key: str) -> bool:
    text = str(value).strip().lower()
    if text in ("1", "true", "yes"):
        return True
    if text in ("0", "false", "no"):
        return False
    raise ConfigError(f"--option {key}={value}: expected true or false")
