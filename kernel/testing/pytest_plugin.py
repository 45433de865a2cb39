"""pytest fixtures for testing mega plugins (see `mega.testing`).

mega-lm registers this module as a pytest plugin through the `pytest11` entry point, so
the fixtures are there in any project where mega-lm is installed:

    def test_my_logger_sees_every_step(mega_experiment, mega_plugin):
        plugins = mega_plugin(MyPlugin())
        run = mega_experiment.run(plugins=plugins, trainer={"max_steps": 3})
        ...

`mega_device` runs a test once on "cpu" and once on "cuda" (skipped without a GPU), so a
plugin that builds a tensor on the wrong device fails where it would in a GPU run.

Fixture names start with `mega_` so they cannot clash with a project's own.
"""
from __future__ import annotations

import contextlib

import pytest

from mega.environment import check_own_package

check_own_package()  # PyPI's `mega` over mega-lm's __init__.py: one clear error, not a missing mega.hookimpl

from mega.testing import TinyExperiment, register_plugin, write_corpus  # noqa: E402


@pytest.fixture(scope="session")
def mega_plugins():
    """Every installed plugin, loaded once per test session (honours MEGA_PLUGINS)."""
    from mega.plugin_manager import load_plugins

    return load_plugins()


@pytest.fixture
def mega_corpus(tmp_path):
    """A 200-line text file of random words, `tmp_path / "corpus.txt"`."""
    return write_corpus(tmp_path / "corpus.txt")


@pytest.fixture
def mega_experiment(tmp_path, mega_corpus, mega_plugins):
    """A `mega.testing.TinyExperiment` training on `mega_corpus` under `tmp_path`:
    `.raw()`, `.config()`, `.toml()` and `.run()` each take top-level tables as keywords."""
    return TinyExperiment(tmp_path, mega_corpus, mega_plugins)


@pytest.fixture
def mega_plugin():
    """`mega_plugin(obj, plugins=None, name=None) -> Plugins`: register a plugin object for
    this test only (see `mega.testing.register_plugin`); it is unregistered at teardown."""
    with contextlib.ExitStack() as stack:
        yield lambda plugin, plugins=None, name=None: stack.enter_context(register_plugin(plugin, plugins, name))


@pytest.fixture(params=["cpu", "cuda"])
def mega_device(request):
    """A torch device type: "cpu", then "cuda" when torch sees a GPU (skipped otherwise)."""
    if request.param == "cuda":
        import torch

        if not torch.cuda.is_available():
            pytest.skip("no CUDA device")
    return request.param
