"""Launching `mega` as a user would: a subprocess on a tiny experiment, a plugin module in a temporary directory."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import tomli_w

from mega.testing import tiny_raw

ROOT = Path(__file__).resolve().parents[2]


def mega_cli(args, tmp_path, env_extra=None, timeout=180):
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}", **(env_extra or {})}
    env.pop("RANK", None)
    return subprocess.run([sys.executable, "-m", "mega", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=tmp_path, env=env)


def experiment(tmp_path, corpus, **sections) -> Path:
    no_dropout = {"hidden_dropout": 0.0, "attention_dropout": 0.0}
    # CPU workers with gloo, on a machine with GPUs too (2 workers on 1 GPU would be refused)
    raw = tiny_raw(tmp_path, corpus, trainer={"max_steps": 4, "val_check_interval": 2, "accelerator": "cpu"}, model=no_dropout)
    from mega.testing import deep_update

    deep_update(raw, sections)
    path = tmp_path / "exp.toml"
    path.write_text(tomli_w.dumps(raw))
    return path


def plugin_module(tmp_path, name, body):
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(body))
    return {"MEGA_PLUGIN_MODULES": name}
