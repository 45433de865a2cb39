"""The plugin system: entry-point loading, MEGA_PLUGINS, errors that name the plugin,
duplicate names, misspelled hooks, `mega plugins`, and the kernel/plugin boundary."""
from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import mega
import mega.plugin_manager as pm_module
from mega.cli import main
from mega.errors import PluginError
from mega.plugin_manager import load_plugins

ROOT = Path(__file__).resolve().parents[2]


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
    assert plugins.info["gpt"].components == {"models": ["gpt"], "model_converters": ["gpt"]}  # GPT owns its interop
    assert plugins.info["gpt"].version == mega.__version__
    assert plugins.models.get("gpt").plugin == "gpt" and plugins.model_converters.get("gpt").plugin == "gpt"
    assert plugins.info["sentencepiece"].components == {"tokenizers": ["sentencepiece"],
                                                         "tokenizer_converters": ["sentencepiece"]}


def test_a_broken_plugin_is_named_with_its_error(fake_entry_points, monkeypatch):
    fake_entry_points("broken_plugin", "raise ImportError('needs libfoo')\n")
    message = "plugin 'broken_plugin' failed to import 'broken_plugin': ImportError: needs libfoo"
    p = load_plugins()  # the others load; the broken one is recorded with its error
    assert p.broken == {"broken_plugin": message} and "gpt" in p.info and "broken_plugin" not in p.info
    with pytest.raises(PluginError, match=message):
        load_plugins(strict=True)
    monkeypatch.setenv("MEGA_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError, match=message):
        load_plugins()


def test_a_missing_name_mentions_the_broken_plugins(fake_entry_points):
    from mega.errors import ConfigError

    fake_entry_points("fancy_models", "raise ModuleNotFoundError(\"No module named 'flash_attn'\")\n")
    p = load_plugins()
    with pytest.raises(ConfigError, match=r"model.name: unknown model 'fancy'.*plugin 'fancy_models' failed to import"
                                          r" 'fancy_models': ModuleNotFoundError: No module named 'flash_attn'"
                                          r" and may have provided it"):
        p.models.get("fancy", "model.name")
    assert p.models.get("gpt").plugin == "gpt"  # what loaded works


@pytest.fixture
def broken_default(fake_entry_points, monkeypatch):
    """The process-wide plugins with one broken third-party plugin (restored afterwards)."""
    fake_entry_points("broken_plugin", "raise ImportError('needs libfoo')\n")
    monkeypatch.delenv("MEGA_BROKEN_PLUGINS_WARNED", raising=False)
    monkeypatch.delenv("MEGA_STRICT_PLUGINS", raising=False)
    pm_module._cached_default.cache_clear()
    yield
    pm_module._cached_default.cache_clear()


def test_mega_plugins_lists_a_broken_plugin_and_still_works(broken_default, capsys):
    assert main(["plugins"]) == 0
    out, err = capsys.readouterr()
    assert "gpt 0.1.0" in out and "models: gpt" in out
    assert "broken_plugin  BROKEN" in out and "ImportError: needs libfoo" in out
    assert err == ""  # listed, not warned about
    assert main(["plugins", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["broken_plugin"]["error"].endswith("ImportError: needs libfoo") and rows["gpt"]["error"] is None


def test_other_commands_warn_once_and_go_on(broken_default, tmp_path, corpus, capsys, monkeypatch):
    from mega.testing import tiny_raw

    import tomli_w

    exp = tmp_path / "exp.toml"
    exp.write_text(tomli_w.dumps(tiny_raw(tmp_path, corpus)))
    assert main(["config", str(exp)]) == 0
    assert main(["config", str(exp), "trainer.max_steps=3"]) == 0
    err = capsys.readouterr().err
    assert err.count("plugin 'broken_plugin'") == 1 and "ImportError: needs libfoo" in err
    assert "continuing without it" in err and "MEGA_STRICT_PLUGINS=1" in err
    # a component only the broken plugin could have provided: the error names it
    assert main(["config", str(exp), "model.name=fancy"]) == 2
    assert "plugin 'broken_plugin' failed to import" in capsys.readouterr().err
    monkeypatch.setenv("MEGA_STRICT_PLUGINS", "1")
    pm_module._cached_default.cache_clear()
    assert main(["config", str(exp)]) == 2
    assert "mega: error: plugin 'broken_plugin' failed to import" in capsys.readouterr().err
    assert main(["plugins"]) == 0  # always works, even strict
    assert "broken_plugin  BROKEN" in capsys.readouterr().out


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
    assert rows["schedules"]["components"] == {"lr_schedulers": ["cosine", "linear", "constant", "inv_sqrt"]}
    assert rows["console"]["hooks"] == ["register_loggers"]
    assert main(["plugins"]) == 0
    text = capsys.readouterr().out
    assert "gpt 0.1.0" in text and "models: gpt" in text
    assert "model_converters: gpt" in text and "tokenizer_converters: sentencepiece" in text  # who owns its interop


# --- one test per hook (datasette's rule): documented, and exercised by some test ---------


def _hook_names() -> list:
    from mega import hookspecs

    return [n for n, f in vars(hookspecs).items() if callable(f) and hasattr(f, "mega_spec")]


def _test_sources() -> str:
    paths = sorted((ROOT / "tests").rglob("test_*.py")) + sorted((ROOT / "contrib").glob("*/tests/test_*.py"))
    return "\n".join(p.read_text() for p in paths)


def _check_hook(name: str) -> None:
    import inspect
    import re

    from mega import hookspecs
    from mega.registry import KINDS

    spec = getattr(hookspecs, name)
    doc = inspect.getdoc(spec)
    assert doc, f"hookspec {name} has no docstring"
    sig = f"{name}{inspect.signature(spec)}"
    assert sig in (ROOT / "docs" / "plugins.md").read_text(), f"docs/plugins.md does not document {sig}"
    # implemented (`def name(`, also inside a plugin written out as source) or called (`.name(`)
    assert re.search(rf"def {name}\(|\.{name}\(", _test_sources()), f"no test implements or calls the hook {name}"
    if name not in KINDS.values():  # a lifecycle hook: the author must know how often it runs
        assert doc.splitlines()[-1].startswith("Called on: "), (
            f"hookspec {name}: the docstring's last line should say which ranks call it ('Called on: ...')")


def _hook_test(name: str):
    def test():
        _check_hook(name)

    test.__name__ = test.__qualname__ = f"test_hook_{name}"
    test.__doc__ = f"The hook {name} is documented with its signature and exercised by a test."
    return test


for _name in _hook_names():
    globals()[f"test_hook_{_name}"] = _hook_test(_name)


def test_the_plugin_guide_documents_only_real_hooks():
    import re

    documented = set()
    for heading in re.findall(r"^###\s+(.*)$", (ROOT / "docs" / "plugins.md").read_text(), re.M):
        documented.update(re.findall(r"`(\w+)\(", heading))
    assert documented == set(_hook_names())


def test_register_tasks_fills_the_tasks_registry(mega_plugin):
    class EchoTask:
        @mega.hookimpl
        def register_tasks(self, register):
            register("echo", lambda config: "echo")

    p = mega_plugin(EchoTask())
    assert p.tasks.get("echo").plugin == "EchoTask" and p.info["EchoTask"].components == {"tasks": ["echo"]}


# --- mega.testing, the helpers plugin authors test with ------------------------------------


def test_a_logger_plugin_is_used_by_name_and_detached_after_the_run(mega_plugin, mega_experiment):
    """The plugin-author path end to end with mega.testing's fixtures: register_loggers
    adds a logger, an experiment names it, it sees the lifecycle in order."""
    seen = []

    class Recorder:
        def __init__(self, run):
            seen.append(("made", run.step))

        @mega.hookimpl
        def on_step_end(self, run, step, metrics):
            seen.append(("step", step, sorted({"loss", "lr"} & set(metrics))))

        @mega.hookimpl
        def on_validation_end(self, run, step, metrics):
            seen.append(("val", step, "val_loss" in metrics))

        @mega.hookimpl
        def on_train_end(self, run):
            seen.append(("end", run.step))

    class RecorderPlugin:
        @mega.hookimpl
        def register_loggers(self, register):
            register("recorder", Recorder)

    p = mega_plugin(RecorderPlugin())
    run = mega_experiment.run(plugins=p, trainer={"max_steps": 2, "val_check_interval": 2},
                              exp_manager={"loggers": ["recorder"]})
    assert seen == [("made", 0), ("step", 1, ["loss", "lr"]), ("step", 2, ["loss", "lr"]), ("val", 2, True), ("end", 2)]
    assert p.pm.get_plugin("logger:recorder") is None and run.run_dir == mega_experiment.run_dir()


def test_register_plugin_joins_a_manager_for_a_with_block(plugins):
    from mega.testing import register_plugin

    class Callback:
        @mega.hookimpl
        def on_train_end(self, run):
            pass

    cb = Callback()
    with register_plugin(cb, plugins) as p:
        assert p is plugins and plugins.pm.is_registered(cb) and plugins.pm.get_name(cb) == "Callback"
    assert not plugins.pm.is_registered(cb)
    with pytest.raises(RuntimeError, match="inside"), register_plugin(cb, plugins):
        raise RuntimeError("inside")
    assert not plugins.pm.is_registered(cb)


def test_register_plugin_refuses_what_it_cannot_honour(plugins):
    from mega.testing import register_plugin

    class Typo:
        @mega.hookimpl
        def on_step_ends(self, run, step, metrics):
            pass

    class Registers:
        @mega.hookimpl
        def register_tasks(self, register):
            pass

    for obj, message in [(Typo(), "implements an unknown hook: on_step_ends"),
                         (Registers(), "implements register_tasks, which run only when plugins are loaded")]:
        with pytest.raises(PluginError, match=message):
            with register_plugin(obj, plugins):
                pass
        assert not plugins.pm.is_registered(obj)
    with pytest.raises(PluginError, match="unknown hook"):
        with register_plugin(Typo()):
            pass


def test_mega_testing_imports_neither_pytest_nor_torch():
    """pytest imports the plugin module at start-up in every project with mega-lm installed."""
    code = ("import sys, mega.testing; "
            "print(sorted(m for m in ('pytest', 'torch', 'cattrs') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_pytest_plugin_is_installed():
    eps = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="pytest11")}
    assert eps.get("mega") == "mega.testing.pytest_plugin", "reinstall: pip install -e ."


@pytest.mark.slow
def test_the_testing_guide_example_passes_outside_the_repo(tmp_path):
    """docs/plugins.md's example test, run by pytest in a directory with no conftest: the
    fixtures reach it through the pytest11 entry point, as they reach a plugin's repo."""
    guide = (ROOT / "docs" / "plugins.md").read_text()
    example = guide[guide.index("# test_my_callback.py"):]
    (tmp_path / "test_my_callback.py").write_text(example[:example.index("```")])
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_my_callback.py"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 passed" in proc.stdout


def test_tiny_experiment_helpers(tmp_path):
    from mega.testing import TinyExperiment, read_metrics, tiny_raw, write_corpus

    corpus = write_corpus(tmp_path / "c.txt", lines=5, seed=3)
    assert corpus.read_text() == write_corpus(tmp_path / "d.txt", lines=5, seed=3).read_text()
    assert len(corpus.read_text().splitlines()) == 5
    sections = {"model": {"optim": {"lr": 0.5}}}
    raw = tiny_raw(tmp_path, corpus, **sections)
    assert raw["model"]["optim"] == {"lr": 0.5, "sched": {"name": "cosine", "warmup_steps": 2}}
    raw["model"]["optim"]["lr"] = 1.0
    assert sections == {"model": {"optim": {"lr": 0.5}}}  # the caller's tables are never aliased
    exp = TinyExperiment(tmp_path, corpus)
    assert exp.config("trainer.max_steps=2").trainer.max_steps == 2
    assert mega.load_config(exp.toml(trainer={"max_steps": 3})).trainer.max_steps == 3
    (exp.run_dir("x")).mkdir(parents=True)
    (exp.run_dir("x") / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    assert read_metrics(exp.run_dir("x")) == [{"step": 1, "loss": 2.0}]


@pytest.mark.slow
def test_third_party_components_of_every_kind_are_used_by_name(tmp_path, corpus):
    """A plugin registers an optimizer, a schedule, a dataset and a checkpoint format; an
    experiment picks each by name and its config keys are checked like first-party ones."""
    import attrs
    import torch

    from mega.config import OptimConfig, SchedConfig
    from mega.plugins.checkpoints.native import NativeFormat
    from mega.plugins.data.text_mmap import TextMemMapConfig, TextMemMapSource
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
