"""Launching and data parallelism on CPU with gloo: `mega run ... trainer.devices=2` goes
through torch's elastic launcher; DP=2 equals one process; a failing or hanging worker
ends the run with its rank and error. Each subprocess has a timeout."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import tomli_w
import torch

from tests.conftest import read_metrics, tiny_raw

ROOT = Path(__file__).resolve().parents[1]


def _mega(args, tmp_path, env_extra=None, timeout=180):
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}", **(env_extra or {})}
    env.pop("RANK", None)
    return subprocess.run([sys.executable, "-m", "mega", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=tmp_path, env=env)


def _exp(tmp_path, corpus, **sections) -> Path:
    no_dropout = {"hidden_dropout": 0.0, "attention_dropout": 0.0}
    raw = tiny_raw(tmp_path, corpus, trainer={"max_steps": 4, "val_check_interval": 2}, model=no_dropout)
    from tests.conftest import _deep_update

    _deep_update(raw, sections)
    path = tmp_path / "exp.toml"
    path.write_text(tomli_w.dumps(raw))
    return path


def _weights(run_dir: Path) -> dict:
    ckpt = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    return torch.load(ckpt / "model.pt", weights_only=True)


@pytest.mark.slow
def test_data_parallel_2_equals_one_process(tmp_path, corpus):
    exp = _exp(tmp_path, corpus)
    one = _mega(["run", str(exp), "exp_manager.name=one", "model.micro_batch_size=8", "model.global_batch_size=8"], tmp_path)
    assert one.returncode == 0, one.stderr
    two = _mega(["run", str(exp), "exp_manager.name=two", "trainer.devices=2", "model.micro_batch_size=2",
                 "model.global_batch_size=8"], tmp_path)
    assert two.returncode == 0, two.stderr
    a, b = read_metrics(tmp_path / "results" / "one"), read_metrics(tmp_path / "results" / "two")
    assert [m["step"] for m in a] == [m["step"] for m in b]
    for x, y in zip(a, b):
        for key in ("loss", "val_loss", "grad_norm"):
            if key in x:
                assert y[key] == pytest.approx(x[key], rel=1e-5), (x["step"], key)
    wa, wb = _weights(tmp_path / "results" / "one"), _weights(tmp_path / "results" / "two")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-6)


def _plugin(tmp_path, name, body):
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(body))
    return {"MEGA_PLUGIN_MODULES": name}


@pytest.mark.slow
def test_a_failing_worker_fails_the_run_with_its_rank_and_error(tmp_path, corpus):
    env = _plugin(tmp_path, "crash_rank1", """
        import os, mega
        @mega.hookimpl
        def on_step_end(run, step, metrics):
            if step == 2 and os.environ["RANK"] == "1":
                raise RuntimeError("boom on rank one")
    """)
    proc = _mega(["run", str(_exp(tmp_path, corpus)), "trainer.devices=2", "model.micro_batch_size=2"], tmp_path, env)
    assert proc.returncode == 1
    assert "worker rank 1 exited with status 1: RuntimeError: boom on rank one" in proc.stderr


@pytest.mark.slow
def test_a_hung_worker_fails_the_run_within_the_timeout(tmp_path, corpus):
    env = _plugin(tmp_path, "hang_rank1", """
        import os, time, mega
        @mega.hookimpl
        def on_step_end(run, step, metrics):
            if step == 1 and os.environ["RANK"] == "1":
                time.sleep(600)
    """)
    proc = _mega(["run", str(_exp(tmp_path, corpus)), "trainer.devices=2", "model.micro_batch_size=2",
                  "trainer.dist_timeout_s=5"], tmp_path, env, timeout=240)
    assert proc.returncode != 0
    assert "worker rank 0 exited" in proc.stderr


def test_multiple_devices_need_a_launcher(tmp_path, corpus, plugins):
    from mega.errors import ConfigError
    from mega.training.run import build_run
    from tests.conftest import tiny_config

    with pytest.raises(ConfigError, match="trainer.devices=2, trainer.num_nodes=1: start this with `mega run`"):
        build_run(tiny_config(tmp_path, corpus, plugins, trainer={"devices": 2}), plugins)
    proc = _mega(["run", str(_exp(tmp_path, corpus)), "trainer.num_nodes=2"], tmp_path)
    assert proc.returncode == 2 and "torchrun --nnodes=2" in proc.stderr


def test_plugin_modules_from_the_environment(tmp_path, monkeypatch):
    from mega.errors import PluginError
    from mega.plugin_manager import load_plugins

    (tmp_path / "local_cb.py").write_text("import mega\n@mega.hookimpl\ndef on_train_end(run):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("MEGA_PLUGIN_MODULES", "local_cb")
    assert load_plugins().info["local_cb"].hooks == ["on_train_end"]
    monkeypatch.setenv("MEGA_PLUGIN_MODULES", "no_such_module_x")
    with pytest.raises(PluginError, match="MEGA_PLUGIN_MODULES: plugin module 'no_such_module_x' failed to import"):
        load_plugins()
