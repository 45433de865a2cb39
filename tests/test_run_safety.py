"""Mistakes are caught before anything is written, each with a message instead of a
traceback: a changed config in an existing run directory, a read-only or full disk,
out-of-range numbers, an untrainable corpus, two runs in one directory."""
from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest

from mega.errors import CheckpointError, ConfigError, DataError
from mega.plugins.checkpoints.native import NativeFormat
from mega.testing import tiny_config
from mega.training import run_dir as run_dir_mod
from mega.checkpoint import CheckpointManager
from mega.training.loop import train
from mega.training.run import build_run, run as run_experiment


def _finished(tmp_path, corpus, plugins, *overrides, **sections):
    sections.setdefault("trainer", {"max_steps": 2, "val_check_interval": 0})
    r = build_run(tiny_config(tmp_path, corpus, plugins, list(overrides), **sections), plugins)
    train(r)
    return r


# --- item 3: a changed config in an existing run directory ----------------------------------
def test_changed_model_shape_stops_before_anything_is_written(tmp_path, corpus, plugins):
    first = _finished(tmp_path, corpus, plugins)
    before = (first.run_dir / "config.toml").read_text()
    cfg = tiny_config(tmp_path, corpus, plugins, ["model.hidden_size=64", "model.seed=7"],
                      trainer={"max_steps": 2, "val_check_interval": 0})
    with pytest.raises(ConfigError) as info:
        build_run(cfg, plugins)
    message = str(info.value)
    assert "model.hidden_size: 32 -> 64" in message and "model.seed: 1234 -> 7" in message
    assert "exp_manager.name=" in message and "exp_manager.resume_ignore_config_changes=true" in message
    assert (first.run_dir / "config.toml").read_text() == before  # untouched


def test_changed_tokenizer_is_not_silently_reused(tmp_path, corpus, plugins):
    sp = {"library": "sentencepiece", "vocab_size": 60}
    _finished(tmp_path, corpus, plugins, model={"tokenizer": sp})
    cfg = tiny_config(tmp_path, corpus, plugins, ["model.tokenizer.vocab_size=80"], model={"tokenizer": sp},
                      trainer={"max_steps": 2, "val_check_interval": 0})
    with pytest.raises(ConfigError, match=r"model\.tokenizer\.vocab_size: 60 -> 80"):
        build_run(cfg, plugins)


def test_safe_changes_resume_with_a_note(tmp_path, corpus, plugins, caplog):
    _finished(tmp_path, corpus, plugins)
    cfg = tiny_config(tmp_path, corpus, plugins, ["model.optim.lr=5e-4", "model.optim.sched.name=linear",
                                                  "exp_manager.checkpoint.keep_last_k=1"],
                      trainer={"max_steps": 4, "val_check_interval": 0, "log_every_n_steps": 2})
    with caplog.at_level("INFO", logger="mega"):
        again = build_run(cfg, plugins)
    assert again.step == 2  # resumed
    assert "trainer.max_steps: 2 -> 4" in caplog.text and "model.optim.lr: 0.001 -> 0.0005" in caplog.text
    train(again)
    assert again.step == 4


def test_a_changed_global_batch_is_not_safe(tmp_path, corpus, plugins):
    _finished(tmp_path, corpus, plugins)
    cfg = tiny_config(tmp_path, corpus, plugins, ["model.micro_batch_size=2"], trainer={"max_steps": 2, "val_check_interval": 0})
    with pytest.raises(ConfigError, match=r"global batch size .*: 4 -> 2"):
        build_run(cfg, plugins)


def test_forcing_resumes_anyway(tmp_path, corpus, plugins, caplog):
    _finished(tmp_path, corpus, plugins)
    cfg = tiny_config(tmp_path, corpus, plugins, ["model.seed=7", "exp_manager.resume_ignore_config_changes=true"],
                      trainer={"max_steps": 2, "val_check_interval": 0})
    with caplog.at_level("WARNING", logger="mega"):
        again = build_run(cfg, plugins)
    assert again.step == 2 and "model.seed: 1234 -> 7" in caplog.text
    assert 'seed = 7' in (again.run_dir / "config.toml").read_text()


def test_bookkeeping_alone_is_not_a_run_to_protect(tmp_path, corpus, plugins):
    cfg = tiny_config(tmp_path, corpus, plugins)
    d = run_dir_mod.run_dir_of(cfg)
    d.mkdir(parents=True)
    (d / "config.toml").write_text("[model]\nhidden_size = 999\n")
    build_run(cfg, plugins)  # nothing trained there yet: no complaint


# --- item 4: messages instead of tracebacks -------------------------------------------------
@pytest.mark.parametrize("override,message", [
    ("model.optim.lr=-1", "model.optim.lr: must be > 0, got -1.0"),
    ("trainer.max_steps=-5", "trainer.max_steps: must be >= 0, got -5"),
    ("model.micro_batch_size=0", "model.micro_batch_size: must be >= 1, got 0"),
    ("exp_manager.checkpoint.keep_last_k=-1", "exp_manager.checkpoint.keep_last_k: must be >= 0, got -1"),
])
def test_out_of_range_numbers_name_the_key(tmp_path, corpus, plugins, override, message):
    with pytest.raises(ConfigError) as info:
        tiny_config(tmp_path, corpus, plugins, [override])
    assert message in str(info.value)


def test_out_of_range_numbers_exit_2_from_the_cli(tmp_path, corpus, capsys):
    from mega.cli import main

    exp = tmp_path / "exp.toml"
    exp.write_text(f'[model.data]\ndata_prefix = ["{corpus}"]\n[exp_manager]\nexp_dir = "{tmp_path}/results"\n')
    assert main(["run", str(exp), "model.optim.lr=-1", "trainer.max_steps=-5"]) == 2
    err = capsys.readouterr().err
    assert "model.optim.lr: must be > 0" in err and "trainer.max_steps: must be >= 0" in err
    assert "Traceback" not in err and not (tmp_path / "results").exists()


def test_read_only_run_directory_is_found_at_the_start(tmp_path, corpus, plugins, monkeypatch):
    real_open = open

    def read_only(path, *args, **kwargs):  # tests run as root, where chmod does not stop writes
        if ".mega-write-probe" in str(path):
            raise PermissionError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(run_dir_mod, "open", read_only, raising=False)
    with pytest.raises(ConfigError, match=r"exp_manager.exp_dir: cannot write to .*Read-only file system"):
        build_run(tiny_config(tmp_path, corpus, plugins), plugins)
    monkeypatch.setattr(run_dir_mod.os, "access", lambda *a, **k: False)
    with pytest.raises(ConfigError, match=r"exp_manager.exp_dir: .* is not writable"):
        build_run(tiny_config(tmp_path, corpus, plugins), plugins)
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("failure", [
    OSError(errno.ENOSPC, "No space left on device"),
    RuntimeError("basic_ios::clear: iostream error"),
])
def test_full_disk_is_named_and_the_old_checkpoint_kept(tmp_path, monkeypatch, failure):
    class Full(NativeFormat):
        def save(self, state, directory, parallel=None):
            (directory / "model.pt").write_bytes(b"partial")
            raise failure

    good = CheckpointManager(tmp_path / "checkpoints", NativeFormat())
    good.save(1, {"model": {}, "trainer": {"step": 1}}, {})
    monkeypatch.setattr("mega.checkpoint.store.shutil.disk_usage", lambda p: SimpleNamespace(total=100, used=100, free=0))
    with pytest.raises(CheckpointError, match=r"no space left on .*checkpoints.*step_0000001 is kept"):
        CheckpointManager(good.root, Full()).save(2, {"model": {}, "trainer": {"step": 2}}, {})
    assert good.latest_good().name == "step_0000001"
    assert sorted(p.name for p in good.root.iterdir()) == ["latest", "step_0000001"]


def test_one_huge_line_names_the_file_and_the_limit(tmp_path, corpus, plugins):
    big = tmp_path / "one_line.txt"
    big.write_text("word " * 20_000)  # 100 kB, no newline: one document longer than sentencepiece takes
    sp = {"library": "sentencepiece", "vocab_size": 60}
    cfg = tiny_config(tmp_path, corpus, plugins, model={"tokenizer": sp, "data": {"data_prefix": [str(big)]}})
    with pytest.raises(DataError, match=rf"{big.name}: 1 of 1 lines longer than 65536 bytes"):
        build_run(cfg, plugins)
    assert not (tmp_path / "results" / "tiny").exists()  # nothing left behind


_HOLD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from mega.training.run_dir import lock_run_dir
    lock_run_dir(Path(sys.argv[1]))
    print("locked", flush=True)
    time.sleep(60)
""")


def test_a_second_run_in_the_same_directory_refuses_naming_the_holder(tmp_path, corpus, plugins):
    cfg = tiny_config(tmp_path, corpus, plugins)
    d = run_dir_mod.run_dir_of(cfg)
    d.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(d)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match=rf"another run is using this run directory \(PID {holder.pid}"):
            build_run(cfg, plugins)
    finally:
        holder.kill()
        holder.wait()
    r = run_experiment(cfg, plugins)  # the holder is gone: the lock is free, and released again at the end
    assert r.step == cfg.trainer.max_steps and d.absolute() not in run_dir_mod._LOCKS


# --- item 7: checks before anything is written ----------------------------------------------
def test_missing_data_file_leaves_no_run_directory(tmp_path, corpus, plugins):
    cfg = tiny_config(tmp_path, corpus, plugins, model={"data": {"data_prefix": [str(tmp_path / "nope.txt")]}})
    with pytest.raises(DataError, match="nope.txt: no such data file"):
        build_run(cfg, plugins)
    assert not (tmp_path / "results" / "tiny").exists()


def test_config_is_written_only_after_data_and_tokenizer(tmp_path, corpus, plugins):
    r = build_run(tiny_config(tmp_path, corpus, plugins), plugins)
    assert (r.run_dir / "config.toml").is_file() and (r.run_dir / "run.json").is_file()
    assert int((r.run_dir / ".lock").read_text()) == os.getpid()
