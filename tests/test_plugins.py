"""The plugin system: entry-point loading, MEGA_PLUGINS, errors that name the plugin,
duplicate names, misspelled hooks, `mega plugins`, and the kernel/plugin boundary."""
from __future__ import annotations

import ast
import importlib.metadata
import json
import sys
import textwrap
from pathlib import Path

import pytest

import mega
import mega.plugin_manager as pm_module
from mega.cli import main
from mega.errors import PluginError
from mega.plugin_manager import load_plugins

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def fake_entry_points(tmp_path, monkeypatch):
    """Install modules under tmp_path and expose them as mega.plugins entry points."""
    monkeypatch.syspath_prepend(str(tmp_path))
    eps = []

    def add(name: str, source: str):
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        sys.modules.pop(name, None)
        eps.append(importlib.metadata.EntryPoint(name=name, value=name, group="mega.plugins"))

    real = pm_module._entry_points()
    monkeypatch.setattr(pm_module, "_entry_points", lambda: real + eps)
    return add


def test_first_party_plugins_load_through_entry_points(plugins):
    assert {"gpt", "sentencepiece", "bytes", "text_mmap", "adamw", "native_checkpoint"} <= set(plugins.info)
    assert plugins.info["gpt"].components == {"models": ["gpt"]}
    assert plugins.info["gpt"].version == mega.__version__
    assert plugins.models.get("gpt").plugin == "gpt"


def test_a_broken_plugin_is_named_with_its_error(fake_entry_points):
    fake_entry_points("broken_plugin", "raise ImportError('needs libfoo')\n")
    with pytest.raises(PluginError, match=r"plugin 'broken_plugin' failed to import 'broken_plugin': ImportError: needs libfoo"):
        load_plugins()


def test_duplicate_names_name_both_plugins(fake_entry_points):
    fake_entry_points("second_gpt", """
        import mega
        @mega.hookimpl
        def register_models(register):
            register("gpt", lambda config, tokenizer: None)
    """)
    with pytest.raises(PluginError, match=r"models 'gpt' is registered by two plugins: 'gpt' and 'second_gpt'"):
        load_plugins()


def test_a_misspelled_hook_is_reported(fake_entry_points):
    fake_entry_points("typo_plugin", """
        import mega
        @mega.hookimpl
        def register_model(register):
            pass
    """)
    with pytest.raises(PluginError, match="typo_plugin.*unknown hook"):
        load_plugins()


def test_a_failing_registration_hook_is_named(fake_entry_points):
    fake_entry_points("bad_register", """
        import mega
        @mega.hookimpl
        def register_tokenizers(register):
            register("x", "not callable")
    """)
    with pytest.raises(PluginError, match="plugin 'bad_register' registered tokenizers 'x' with a factory that is not callable"):
        load_plugins()


def test_mega_plugins_restricts_what_loads(monkeypatch):
    p = load_plugins(only="gpt,bytes")
    assert set(p.info) == {"gpt", "bytes"} and p.models.names() == ["gpt"] and len(p.optimizers) == 0
    assert load_plugins(only="").info == {}
    monkeypatch.setenv("MEGA_PLUGINS", "bytes")
    assert set(load_plugins().info) == {"bytes"}
    with pytest.raises(PluginError, match="MEGA_PLUGINS names 'gtp'.*did you mean gpt"):
        load_plugins(only="gtp")


def test_registered_config_must_subclass_the_base(fake_entry_points, plugins):
    fake_entry_points("bad_config", """
        import attrs, mega
        @attrs.define
        class NotAModelConfig:
            depth: int = 1
        @mega.hookimpl
        def register_models(register):
            register("weird", lambda c, t: None, config=NotAModelConfig)
    """)
    from mega.config import config_from_dict

    with pytest.raises(PluginError, match="must subclass mega.config.ModelConfig"):
        config_from_dict({"model": {"name": "weird"}}, plugins=load_plugins())


def test_mega_plugins_command(capsys):
    assert main(["plugins", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["schedules"]["components"] == {"lr_schedulers": ["cosine", "linear", "constant"]}
    assert rows["console"]["hooks"] == ["register_loggers"]
    assert main(["plugins"]) == 0
    text = capsys.readouterr().out
    assert "gpt 0.1.0" in text and "models: gpt" in text


def test_the_kernel_never_imports_first_party_plugins():
    for path in (ROOT / "kernel").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for n in names:
                assert not n.startswith("mega.plugins"), f"{path.relative_to(ROOT)} imports {n}"


def _hook_names():
    from mega import hookspecs

    return [n for n, f in vars(hookspecs).items() if callable(f) and hasattr(f, "mega_spec")]


def test_every_hook_is_documented_with_its_signature():
    import inspect

    from mega import hookspecs

    docs = (ROOT / "docs" / "plugins.md").read_text()
    for name in _hook_names():
        sig = f"{name}{inspect.signature(getattr(hookspecs, name))}"
        assert sig in docs, f"docs/plugins.md does not document {sig}"
        assert getattr(hookspecs, name).__doc__, f"hookspec {name} has no docstring"


def test_every_hook_has_a_test():
    """Each hook name appears in a test other than this meta-test (datasette's rule)."""
    sources = "".join(p.read_text() for p in (ROOT / "tests").glob("test_*.py"))
    sources += "".join(p.read_text() for p in (ROOT / "contrib").rglob("test_*.py"))
    for name in _hook_names():
        if name == "register_tasks":
            continue  # its first implementation arrives with the downstream-tasks plugins
        assert name in sources, f"no test uses the hook {name}"


def test_third_party_components_of_every_kind_are_used_by_name(tmp_path, corpus):
    """A plugin registers an optimizer, a schedule, a dataset and a checkpoint format; an
    experiment picks each by name and its config keys are checked like first-party ones."""
    import attrs
    import torch

    from mega.config import OptimConfig, SchedConfig
    from mega.plugins.checkpoints.native import NativeFormat
    from mega.plugins.data.text_mmap_plugin import TextMemMapConfig, TextMemMapSource
    from mega.training.loop import train
    from mega.training.run import build_run
    from mega.testing import read_metrics, tiny_config

    used = set()

    @attrs.define(kw_only=True)
    class SGDConfig(OptimConfig):
        momentum: float = 0.0

    @attrs.define(kw_only=True)
    class StepConfig(SchedConfig):
        gamma: float = 0.5

    @attrs.define(kw_only=True)
    class ReversedConfig(TextMemMapConfig):
        data_impl: str = "reversed_text"

    class Reversed(TextMemMapSource):
        def dataset(self, *args, **kwargs):
            used.add("dataset")
            return super().dataset(*args, **kwargs)

    class Tagged(NativeFormat):
        name = "tagged"

        def save(self, state, directory, parallel=None):
            used.add("format")
            super().save(state, directory, parallel)

    class ThirdParty:
        @mega.hookimpl
        def register_optimizers(self, register):
            register("sgd", lambda c, groups: torch.optim.SGD(groups, lr=c.lr, momentum=c.momentum), config=SGDConfig)

        @mega.hookimpl
        def register_lr_schedulers(self, register):
            register("halving", lambda c, lr, steps: (lambda s: lr * c.gamma ** s), config=StepConfig)

        @mega.hookimpl
        def register_datasets(self, register):
            register("reversed_text", lambda c, run_dir: Reversed(c, run_dir), config=ReversedConfig)

        @mega.hookimpl
        def register_checkpoint_formats(self, register):
            register("tagged", Tagged)

    p = load_plugins(extra=[ThirdParty()])
    cfg = tiny_config(tmp_path, corpus, p, ["model.optim.momentum=0.9", "model.optim.sched.gamma=0.25"],
                      trainer={"max_steps": 3, "val_check_interval": 0},
                      exp_manager={"checkpoint": {"format": "tagged"}},
                      model={"optim": {"name": "sgd", "sched": {"name": "halving"}},
                             "data": {"data_impl": "reversed_text"}})
    run = build_run(cfg, p)
    assert isinstance(run.optimizer, torch.optim.SGD) and run.optimizer.defaults["momentum"] == 0.9
    train(run)
    assert [m["lr"] for m in read_metrics(run.run_dir)] == pytest.approx([1e-3, 2.5e-4, 6.25e-5])
    assert used == {"dataset", "format"}
    assert json.loads((run.checkpoints.checkpoints()[-1] / "manifest.json").read_text())["format"] == "tagged"
