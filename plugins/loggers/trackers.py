"""What the experiment-tracker loggers (`wandb`, `mlflow`) share: the check that their
optional package is installed, their settings table read strictly, the resolved config
as run parameters, and the tracker run ids a run directory keeps so that a resumed run
continues the same tracker run.

The ids live in `<run_dir>/trackers.json` (`{"wandb": {"id": ...}, "mlflow": {"run_id":
..., "tracking_uri": ...}}`), written atomically by rank 0 when a tracker run is opened.
A run that resumes from a checkpoint reopens the stored run; a run that starts from step
0 (a new run directory, or one whose start failed before its first checkpoint) opens a
new one, so a tracker run always describes one trajectory of the weights.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any, Dict, Optional

from mega.checkpoint.atomic import atomic_write_text
from mega.config import structure_table, to_dict
from mega.errors import ConfigError

TRACKERS_FILE = "trackers.json"


def require_package(module: str, extra: str, key: str) -> None:
    """A ConfigError naming `key` (the config key that asked for the logger) and the extra
    that installs `module`, when it is not importable."""
    if importlib.util.find_spec(module) is None:
        raise ConfigError(f"{key}: the {extra} logger needs the `{module}` package, which is not installed;"
                          f" pip install 'mega-lm[{extra}]'")


def logger_key(config, name: str) -> str:
    """The config key that attached logger `name`: `exp_manager.loggers` when listed
    there, else NeMo's `exp_manager.create_<name>_logger`."""
    return "exp_manager.loggers" if name in config.exp_manager.loggers else f"exp_manager.create_{name}_logger"


def read_settings(config, name: str, cls: type):
    """`exp_manager.<name>_logger_kwargs` structured into the attrs class `cls` with the
    config's strict rules: an unknown key or a wrong type is a ConfigError at its dotted key."""
    raw = getattr(config.exp_manager, f"{name}_logger_kwargs")
    return structure_table(dict(raw), cls, None, path=f"exp_manager.{name}_logger_kwargs")


def flat_params(config, limit: Optional[int] = None) -> Dict[str, str]:
    """The resolved config as `dotted.key -> text` (arrays as JSON), for trackers whose
    parameters are flat strings; a value longer than `limit` characters is cut."""
    out: Dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
            return
        text = json.dumps(node) if isinstance(node, (list, bool)) or node is None else str(node)
        if limit is not None and len(text) > limit:
            text = text[: limit - 3] + "..."
        out[prefix[:-1]] = text

    walk(to_dict(config), "")
    return out


class TrackerRuns:
    """`<run_dir>/trackers.json`: the tracker runs this run directory logs to."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / TRACKERS_FILE

    def read(self) -> dict:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{self.path}: cannot read the tracker runs of this run directory ({exc}); delete it to"
                              " start new tracker runs") from None
        return data if isinstance(data, dict) else {}

    def get(self, tracker: str) -> dict:
        entry = self.read().get(tracker)
        return entry if isinstance(entry, dict) else {}

    def put(self, tracker: str, entry: dict) -> None:
        data = self.read()
        data[tracker] = entry
        atomic_write_text(self.path, json.dumps(data, indent=1) + "\n")
