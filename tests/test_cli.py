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

ROOT = Path(__file__).resolve().parents[1]


def _write_toml(path: Path, raw: dict) -> Path:
    import tomli_w

    path.write_text(tomli_w.dumps(raw))
    return path


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


def test_config_prints_the_resolved_toml(tmp_path, corpus, capsys):
    exp = _write_toml(tmp_path / "exp.toml", tiny_raw(tmp_path, corpus))
    assert main(["config", str(exp), "trainer.max_steps=9", "++model.optim.sched.min_lr=1e-5"]) == 0
    out = capsys.readouterr().out
    assert "max_steps = 9" in out and "min_lr = 1e-05" in out and "[model.optim.sched]" in out


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
