"""The command line as a user meets it: exit status 2 and one readable line for bad
input, `mega config` output, `mega generate` from a trained run, and the generated
configuration reference staying in step with the schema."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mega.cli import main
from mega.config.reference import configuration_reference
from mega.testing import tiny_raw

ROOT = Path(__file__).resolve().parents[2]


def _write_toml(path: Path, raw: dict) -> Path:
    import tomli_w

    path.write_text(tomli_w.dumps(raw))
    return path


@pytest.mark.slow
def test_bad_config_exits_2_with_one_line_naming_the_key(tmp_path):
    exp = tmp_path / "exp.toml"
    exp.write_text("[model]\nhiden_size = 64\n")
    proc = subprocess.run([sys.executable, "-m", "mega", "run", str(exp)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"mega: error: {exp}: model.hiden_size: unknown key, did you mean hidden_size?"
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("args,message", [
    (["run", "missing.toml"], "missing.toml: no such experiment file"),
    (["config", "{exp}", "trainer.max_stepz=3"], "trainer.max_stepz: no such key to override"),
    (["config", "{exp}", "model.name=gtp"], "model.name: unknown model 'gtp', did you mean gpt?"),
    (["generate", "{tmp}", "--prompt", "x"], "not a checkpoint"),
])
def test_input_errors_exit_2(tmp_path, capsys, args, message):
    exp = tmp_path / "exp.toml"
    exp.write_text("[trainer]\nmax_steps = 3\n")
    assert main([a.format(exp=exp, tmp=tmp_path) for a in args]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("command", [["evaluate", "{file}"], ["generate", "{file}", "--prompt", "x"],
                                     ["predict", "{file}", "--text", "x"], ["encode", "{file}", "--text", "x", "--output", "o"],
                                     ["import", "{file}", "{tmp}/run"]])
def test_an_unrecognised_checkpoint_file_suggests_only_flags_the_command_has(tmp_path, capsys, command):
    """Issue 20: `mega evaluate FILE` told the user to name a format with --from, a flag
    only `mega import` has. Every --flag an error suggests must be one of its command."""
    import re

    from mega.cli import _parser

    junk = tmp_path / "model.bin"
    junk.write_bytes(b"not a checkpoint")
    assert main([a.format(file=junk, tmp=tmp_path) for a in command]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint format recognises it" in err
    sub = next(a for a in _parser()._actions if a.__class__.__name__ == "_SubParsersAction").choices[command[0]]
    flags = {s for a in sub._actions for s in a.option_strings}
    # flags of the command itself, or of a command the message tells to run (`mega import ... --from`)
    suggested = {f for f in re.findall(r"(?<![\w`])--[a-z][a-z-]*", err) if f not in flags}
    shown_with_import = set(re.findall(r"`mega import [^`]*?(--[a-z-]+)", err))
    assert suggested <= shown_with_import, f"mega {command[0]} suggests {sorted(suggested)}: {err}"


def test_config_prints_the_resolved_toml(tmp_path, corpus, capsys):
    exp = _write_toml(tmp_path / "exp.toml", tiny_raw(tmp_path, corpus))
    assert main(["config", str(exp), "trainer.max_steps=9", "++model.optim.sched.min_lr=1e-5"]) == 0
    out = capsys.readouterr().out
    assert "max_steps = 9" in out and "min_lr = 1e-05" in out and "[model.optim.sched]" in out


@pytest.mark.slow
def test_run_then_generate(tmp_path, corpus, capsys):
    raw = tiny_raw(tmp_path, corpus, trainer={"max_steps": 4})
    exp = _write_toml(tmp_path / "exp.toml", raw)
    assert main(["run", str(exp)]) == 0
    run_dir = tmp_path / "results" / "tiny"
    assert main(["generate", str(run_dir), "--prompt", "the model", "--max-new-tokens", "8", "--greedy"]) == 0
    greedy = capsys.readouterr().out
    assert greedy.startswith("the model") and len(greedy) > len("the model")
    assert main(["generate", str(run_dir / "checkpoints" / "step_0000004"), "--prompt", "the",
                 "--top-k", "5", "--top-p", "0.9", "--temperature", "0.8", "--seed", "1"]) == 0


@pytest.mark.parametrize("flags,message", [
    (["--top-p", "2"], "--top-p: must be in (0, 1]"),
    (["--top-p", "0"], "--top-p: must be in (0, 1]"),  # no token would be left to sample
    (["--top-k", "-1"], "--top-k: must be >= 0"),
    (["--temperature", "0"], "--temperature: must be positive"),
    (["--max-new-tokens", "-1"], "--max-new-tokens: must be >= 0"),
])
def test_generate_refuses_sampling_settings_out_of_range(tmp_path, corpus, capsys, flags, message):
    """Issue 20: `mega generate --top-p 2` sampled anyway; each setting out of range exits 2
    naming the flag, before the checkpoint is loaded."""
    exp = _write_toml(tmp_path / "exp.toml", tiny_raw(tmp_path, corpus, trainer={"max_steps": 1, "val_check_interval": 0}))
    assert main(["run", str(exp)]) == 0
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "results" / "tiny"), "--prompt", "the", "--seed", "1", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mega: error: {message}") and "Traceback" not in err


def test_generate_with_a_trained_sentencepiece_tokenizer(tmp_path, corpus, capsys):
    """The tokenizer trained into the run dir travels inside the checkpoint."""
    raw = tiny_raw(tmp_path, corpus, trainer={"max_steps": 2, "val_check_interval": 0},
                   model={"tokenizer": {"library": "sentencepiece", "vocab_size": 60}})
    assert main(["run", str(_write_toml(tmp_path / "exp.toml", raw))]) == 0
    ckpt = tmp_path / "results" / "tiny" / "checkpoints" / "step_0000002"
    assert (ckpt / "tokenizer.tokenizer.model").is_file()
    (tmp_path / "results" / "tiny" / "tokenizer.model").unlink()  # the checkpoint must not need it
    capsys.readouterr()
    assert main(["generate", str(ckpt), "--prompt", "the model", "--max-new-tokens", "6", "--greedy"]) == 0
    from mega.checkpoint import restore
    from mega.inference import generate

    model, tok, _ = restore(ckpt)
    prompt = tok.encode("the model")
    expected = tok.decode(prompt + generate(model, prompt, 6, greedy=True, eos_id=tok.eos_id))
    assert capsys.readouterr().out == expected + "\n"


def test_configuration_reference_is_current():
    """docs/configuration.md documents mega-lm's own components, whatever else is installed."""
    from importlib.metadata import entry_points

    from mega.plugin_manager import load_plugins

    ours = ",".join(sorted(ep.name for ep in entry_points(group="mega.plugins") if ep.dist and ep.dist.name == "mega-lm"))
    documented = (ROOT / "docs" / "configuration.md").read_text()
    assert documented == configuration_reference(load_plugins(only=ours)), \
        f"run: MEGA_PLUGINS={ours} mega config --reference > docs/configuration.md"


def test_examples_validate(plugins):
    from mega.config import load_config

    for exp in (ROOT / "examples").glob("*.toml"):
        load_config(exp, plugins=plugins)


class _RunsCode:
    """Unpickling this calls print: what weights_only loading exists to refuse."""

    def __reduce__(self):
        return (print, ("code from a checkpoint ran",))


def _unsafe_file(path):
    import torch

    torch.save({"weight": _RunsCode()}, path)
    return path


def test_an_unsafe_checkpoint_is_refused_without_torchs_advice_to_load_it_unsafely(tmp_path):
    """Issue 20: the refusal repeated torch's "Re-running torch.load with weights_only set
    to False will likely succeed": advice mega never follows. The message names what the
    file holds and says it is refused; a file that is not a torch file says so."""
    from mega.errors import CheckpointError
    from mega.plugins.checkpoints.huggingface import read_weights as _read_weights
    from mega.plugins.checkpoints.megatron.files import load_file
    from mega.plugins.checkpoints.native import NativeFormat

    _unsafe_file(tmp_path / "model.pt")
    _unsafe_file(tmp_path / "model_optim_rng.pt")
    hf = tmp_path / "hf"
    hf.mkdir()
    _unsafe_file(hf / "pytorch_model.bin")
    messages = []
    for load in (lambda: NativeFormat().load(tmp_path), lambda: _read_weights(hf),
                 lambda: load_file(tmp_path / "model_optim_rng.pt", "model_optim_rng.pt")):
        with pytest.raises(CheckpointError) as info:
            load()
        messages.append(str(info.value))
    for message in messages:
        assert "print" in message and "torch.load(weights_only=True)" in message, message
        assert "weights_only` set to `False" not in message and "will likely succeed" not in message, message
        assert "add_safe_globals" not in message and "\n" not in message.strip(), message
    (tmp_path / "model.pt").write_bytes(b"\x80\x02garbage" * 8)
    with pytest.raises(CheckpointError, match=r"model.pt: cannot be read: not a file torch.save wrote, or a damaged one"):
        NativeFormat().load(tmp_path)
