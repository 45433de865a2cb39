"""Mistakes are caught before anything is written, each with a message instead of a
traceback: a changed config in an existing run directory, a read-only or full disk,
out-of-range numbers, an untrainable corpus, two runs in one directory."""
from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

import mega
from mega.errors import CheckpointError, ConfigError, DataError, MegaError
from mega.plugins.checkpoints.native import NativeFormat
from mega.testing import tiny_config, write_corpus
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
                      trainer={"max_steps": 3, "val_check_interval": 0})
    with caplog.at_level("WARNING", logger="mega"):
        again = build_run(cfg, plugins)
    assert again.step == 2 and "model.seed: 1234 -> 7" in caplog.text
    assert 'seed = 7' in (again.run_dir / "config.toml").read_text()  # it goes on: the config is its own now


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


def test_a_read_only_checkpoints_folder_is_found_at_the_start(tmp_path, corpus, plugins, monkeypatch):
    """Issue 20, item 2: a writable run directory whose checkpoints/ is read-only (a mount,
    permissions) is reported before the first step, not by a PermissionError at the first
    save with every step lost."""
    first = _finished(tmp_path, corpus, plugins)
    before = (first.run_dir / "config.toml").read_text()
    real_open = open

    def read_only_checkpoints(path, *args, **kwargs):  # tests run as root, where chmod does not stop writes
        if ".mega-write-probe" in str(path) and Path(path).parent.name == "checkpoints":
            raise PermissionError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(run_dir_mod, "open", read_only_checkpoints, raising=False)
    more = tiny_config(tmp_path, corpus, plugins, trainer={"max_steps": 4, "val_check_interval": 0})
    with pytest.raises(ConfigError, match=r"cannot write to .*/tiny/checkpoints \(Read-only file system\); checkpoints"
                                          r" could not be saved"):
        build_run(more, plugins)
    assert (first.run_dir / "config.toml").read_text() == before
    real_access = os.access
    monkeypatch.setattr(run_dir_mod, "open", real_open, raising=False)
    monkeypatch.setattr(run_dir_mod.os, "access", lambda p, mode: Path(p).name != "checkpoints" and real_access(p, mode))
    with pytest.raises(ConfigError, match=r"/tiny/checkpoints is not writable; checkpoints could not be saved"):
        build_run(more, plugins)


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


@pytest.mark.slow
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


# --- issue 20, item 1: a start that fails leaves a run directory the corrected run can use ---
BERT = {"name": "bert", "seq_length": 32, "max_position_embeddings": 32, "num_layers": 1,
        "tokenizer": {"library": "wordpiece", "vocab_size": 120}, "data": {"sentence_split": "punctuation"}}


def _sentences(path, lines: int = 60):
    """Documents of several sentences each (what BERT's sentence pairs are cut from)."""
    from mega.testing import WORDS

    rng = __import__("random").Random(3)
    path.write_text("".join(". ".join(" ".join(rng.choice(WORDS) for _ in range(6)).capitalize() for _ in range(4)) + ".\n"
                            for _ in range(lines)))
    return path


def _failing_start(tmp_path, corpus, plugins, case: str):
    """(failing config, corrected config) of each start the issue lists that fails before training."""
    short = {"max_steps": 2, "val_check_interval": 1, "limit_val_batches": 1}
    if case == "empty valid split":
        return (tiny_config(tmp_path, corpus, plugins, ["model.data.splits_string=100,0,0"], trainer=short),
                tiny_config(tmp_path, corpus, plugins, trainer=short))
    if case == "bert text without sentence pairs":
        one_sentence = tmp_path / "one_sentence_per_document.txt"
        one_sentence.write_text("".join(f"word{i} and more words\n" for i in range(60)))
        good = _sentences(tmp_path / "sentences.txt")
        return (tiny_config(tmp_path, corpus, plugins, [f"model.data.data_prefix=[{one_sentence}]"], model=BERT, trainer=short),
                tiny_config(tmp_path, corpus, plugins, [f"model.data.data_prefix=[{good}]"], model=BERT, trainer=short))
    from mega.config import config_from_dict
    from tests.helpers.txl import txl_raw

    def txl(cutoffs):  # a word vocabulary of the test corpus: 25 words and <eos>
        raw = txl_raw(tmp_path, corpus, trainer=short, model={"tokenizer": {"library": "word"}, "cutoffs": cutoffs})
        raw["exp_manager"]["name"] = "tiny"
        return config_from_dict(raw, [], plugins)

    return txl([500]), txl([10])


@pytest.mark.parametrize("case", ["empty valid split", "bert text without sentence pairs",
                                  "transformer-xl cutoff above the vocabulary"])
def test_a_start_that_fails_writes_no_config_and_the_corrected_run_trains(tmp_path, corpus, plugins, case):
    bad, good = _failing_start(tmp_path, corpus, plugins, case)
    run_dir = run_dir_mod.run_dir_of(bad)
    with pytest.raises((ConfigError, DataError)):
        build_run(bad, plugins)
    assert not run_dir.exists()  # the run directory it created is gone, tokenizer and tokenized data with it
    run_dir.mkdir(parents=True)  # and one that existed before keeps no config.toml of the failed start
    with pytest.raises((ConfigError, DataError)):
        build_run(bad, plugins)
    assert not (run_dir / "config.toml").exists() and not (run_dir / "run.json").exists()
    r = build_run(good, plugins)
    train(r)
    assert r.step == 2 and "model.data" in (run_dir / "config.toml").read_text()


def test_a_tokenizer_trained_from_the_bad_file_is_trained_again(tmp_path, corpus, plugins, caplog):
    """The failed start trained a WordPiece vocabulary on the file without sentence pairs;
    the corrected run (no checkpoint there) trains its own instead of reusing it."""
    bad, good = _failing_start(tmp_path, corpus, plugins, "bert text without sentence pairs")
    run_dir = run_dir_mod.run_dir_of(bad)
    run_dir.mkdir(parents=True)
    with pytest.raises(DataError, match="sentence"):
        build_run(bad, plugins)
    from_bad = (run_dir / "vocab.txt").read_text()
    with caplog.at_level("WARNING", logger="mega"):
        r = build_run(good, plugins)
    assert "one_sentence_per_document.txt" in caplog.text and "training it again" in caplog.text
    fresh = tmp_path / "fresh"
    fresh_cfg = tiny_config(fresh, corpus, plugins, [f"model.data.data_prefix=[{tmp_path / 'sentences.txt'}]"], model=BERT,
                            trainer={"max_steps": 2, "val_check_interval": 1, "limit_val_batches": 1})
    build_run(fresh_cfg, plugins)
    vocab = (run_dir / "vocab.txt").read_text()
    assert vocab != from_bad and vocab == (run_dir_mod.run_dir_of(fresh_cfg) / "vocab.txt").read_text()
    train(r)
    assert r.step == 2


def test_forcing_a_changed_corpus_keeps_the_tokenizer_the_checkpoints_need_and_says_so(tmp_path, corpus, plugins, caplog):
    sp = {"library": "sentencepiece", "vocab_size": 60}
    first = _finished(tmp_path, corpus, plugins, model={"tokenizer": sp})
    before = (first.run_dir / "tokenizer.model").read_bytes()
    other = write_corpus(tmp_path / "other.txt", seed=5)
    cfg = tiny_config(tmp_path, corpus, plugins, [f"model.data.data_prefix=[{other}]",
                                                  "exp_manager.resume_ignore_config_changes=true"],
                      model={"tokenizer": sp}, trainer={"max_steps": 3, "val_check_interval": 0})
    with caplog.at_level("WARNING", logger="mega"):
        again = build_run(cfg, plugins)
    assert again.step == 2 and (first.run_dir / "tokenizer.model").read_bytes() == before
    assert "was trained from other inputs" in caplog.text and "other.txt" in caplog.text and "it is kept" in caplog.text


def _fails_at_step_1(tmp_path, plugins, model: dict):
    from mega.config import config_from_dict
    from tests.helpers.tasks import task_raw as _raw

    raw = _raw(tmp_path / "data", tmp_path, "mc", model, 2)
    raw["trainer"]["val_check_interval"] = 0
    return config_from_dict(raw, [], plugins)


class _FailsAtStep1:
    """A start that fails once training started, before its first checkpoint, whatever the
    cause (a record the reader let through, a loss that cannot be computed): the hook
    raises at the first step it sees (a logged one) while `armed`."""

    armed = True

    @mega.hookimpl
    def on_step_end(self, run, step, metrics):
        if self.armed:
            raise DataError(f"a record of the training file cannot be used (simulated at step {step})")


@pytest.mark.parametrize("case", ["swag label out of range", "swag file failing at step 1", "corrupt lm_checkpoint"])
@pytest.mark.slow
def test_a_run_that_failed_before_its_first_checkpoint_takes_the_corrected_config(tmp_path, plugins, case):
    """The issue's multiple-choice starts: a SWAG file with a label out of range (refused
    when the file is read), one that fails in the first step, and a corrupt lm_checkpoint
    (refused by on_train_start). The last two have written config.toml but no checkpoint.
    Re-running with the corrected input into the same directory trains: with no checkpoint
    there is nothing to resume, and no config to protect."""
    from mega.config import config_from_dict
    from mega.testing import register_plugin
    from tests.helpers.tasks import task_files as _files, task_raw as _raw

    d = _files(tmp_path / "data")["dir"]
    good = {"name": "multiple_choice", "train_ds": {"file": str(d / "swag.csv")},
            "dataset": {"format": "swag", "max_seq_length": 16}}
    bad_file = d / "bad_swag.csv"
    if case == "swag label out of range":
        bad_file.write_text((d / "swag.csv").read_text().replace(",0\n", ",9\n"))  # label 9 of 4 endings
    else:
        bad_file.write_text((d / "swag.csv").read_text())
    bad = {**good, "train_ds": {"file": str(bad_file)}}
    if case == "corrupt lm_checkpoint":
        encoder_raw = _raw(d, tmp_path, "encoder", {"name": "text_classification", "train_ds": str(d / "sentiment.tsv"),
                                                    "dataset": {"num_classes": 2, "max_seq_length": 16}}, 1)
        encoder_raw["trainer"]["val_check_interval"] = 0
        encoder = run_experiment(config_from_dict(encoder_raw, [], plugins), plugins)
        (d / "corrupt.pt").write_bytes(b"not a checkpoint" * 64)
        language_model = _raw(d, tmp_path, "", {})["model"]["language_model"]
        bad = {**good, "language_model": {**language_model, "lm_checkpoint": str(d / "corrupt.pt")}}
        good = {**good, "language_model": {**language_model, "lm_checkpoint": str(encoder.run_dir)}}
    step1 = _FailsAtStep1()
    with register_plugin(step1, plugins) if case == "swag file failing at step 1" else contextlib.nullcontext():
        with pytest.raises(MegaError):
            run_experiment(_fails_at_step_1(tmp_path, plugins, bad), plugins)
        step1.armed = False
        run_dir = tmp_path / "results" / "mc"
        assert not list(run_dir.glob("checkpoints/step_*"))  # it never saved
        r = run_experiment(_fails_at_step_1(tmp_path, plugins, good), plugins)
    written = (run_dir / "config.toml").read_text()
    assert r.step == 2 and "corrupt.pt" not in written and "bad_swag" not in written


# --- issue 20, item 3: re-running a finished run leaves its files alone ---------------------
def _files_of(run_dir):
    return {str(p.relative_to(run_dir)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(run_dir.rglob("*")) if p.is_file() and p.name != ".lock"}


def test_a_finished_run_has_nothing_to_do_and_leaves_its_files_alone(tmp_path, corpus, plugins, caplog):
    first = _finished(tmp_path, corpus, plugins, "exp_manager.loggers=[jsonl,tensorboard]")
    before = _files_of(first.run_dir)
    assert "config.toml" in before and any(k.startswith("tensorboard/") for k in before)
    # resume-safe changes, as the README's `trainer.devices=2` line was on the quickstart run
    again = tiny_config(tmp_path, corpus, plugins, ["exp_manager.loggers=[jsonl,tensorboard]", "trainer.log_every_n_steps=2",
                                                    "model.micro_batch_size=2", "trainer.accumulate_grad_batches=2"],
                        trainer={"max_steps": 2, "val_check_interval": 0})
    with caplog.at_level("INFO", logger="mega"):
        r = run_experiment(again, plugins)
    assert r.step == 2 and "nothing to do" in caplog.text
    assert _files_of(first.run_dir) == before
