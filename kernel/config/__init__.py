"""Experiment configuration: TOML file + Hydra-style overrides -> attrs classes.

    cfg = mega.config.load_config("exp.toml", ["trainer.max_steps=10"])
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Sequence

import attrs

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

import tomli_w

from mega.config.overrides import apply_overrides, parse_value
from mega.config.schema import (
    CheckpointConfig,
    DataConfig,
    Duration,
    ExperimentConfig,
    ExpManagerConfig,
    HiddenLossConfig,
    HiddenTransformConfig,
    ModelConfig,
    NamedTables,
    OptimConfig,
    Precision,
    SchedConfig,
    TokenizerConfig,
    TrainerConfig,
)
from mega.config.structure import schema_has, schema_keys, structure, structure_table
from mega.errors import ConfigError

__all__ = [
    "CheckpointConfig", "DataConfig", "Duration", "ExperimentConfig", "ExpManagerConfig", "HiddenLossConfig",
    "HiddenTransformConfig", "ModelConfig", "NamedTables", "OptimConfig", "Precision", "SchedConfig",
    "TokenizerConfig", "TrainerConfig", "load_config", "load_raw", "config_from_dict", "dump_config",
    "parse_value", "structure_table", "to_dict",
]


def load_raw(path: os.PathLike | str) -> dict:
    """Read a TOML file; a missing file or a syntax error names the file (and line)."""
    p = Path(path)
    try:
        with p.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such experiment file") from None
    except IsADirectoryError:
        raise ConfigError(f"{p}: is a directory, expected a TOML file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: invalid TOML: {exc}") from None


def config_from_dict(raw: dict, overrides: Sequence[str] = (), plugins=None, source: str = "") -> ExperimentConfig:
    """Apply overrides to a raw dict and structure it (validating every key)."""
    if plugins is None:
        from mega.plugin_manager import get_plugins

        plugins = get_plugins()
    apply_overrides(raw, list(overrides), lambda r, path: _exists(r, path, plugins),
                    lambda r, path: schema_keys(r, path, plugins))
    return structure(raw, plugins, source=source)


def load_config(path: os.PathLike | str, overrides: Sequence[str] = (), plugins=None) -> ExperimentConfig:
    """Load an experiment TOML, apply command-line overrides, validate everything."""
    return config_from_dict(load_raw(path), overrides, plugins, source=str(path))


def _exists(raw: dict, path: List[str], plugins) -> bool:
    node = raw
    for part in path:
        if not isinstance(node, dict) or part not in node:
            return schema_has(raw, path, plugins)
        node = node[part]
    return True


def to_dict(cfg) -> dict:
    """Plain nested dict of a config (None values dropped: TOML has no null)."""

    def clean(value):
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items() if v is not None}
        if isinstance(value, list):
            return [clean(v) for v in value]
        if isinstance(value, str):
            return str(value)
        return value

    return clean(attrs.asdict(cfg, recurse=True))


def dump_config(cfg) -> str:
    """The resolved configuration as TOML text (round-trips through load_config)."""
    return tomli_w.dumps(to_dict(cfg))
