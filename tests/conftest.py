"""mega's own tests use the same helpers a plugin author gets from `mega.testing`.

`plugins` and `corpus` are this suite's short names for `mega_plugins` and `mega_corpus`.
The helper names are re-exported so `from tests.conftest import tiny_config` keeps
working, but new tests import them from `mega.testing`.
"""
from __future__ import annotations

import pytest

from mega.testing import (  # noqa: F401  (re-exported)
    WORDS,
    deep_update,
    read_metrics,
    tiny_config,
    tiny_raw,
    write_corpus,
)
# The fixtures are normally loaded by the `pytest11` entry point; importing them here keeps
# this suite working in an environment installed before that entry point existed.
from mega.testing.pytest_plugin import mega_corpus, mega_experiment, mega_plugin, mega_plugins  # noqa: F401

_deep_update = deep_update  # the old private name


@pytest.fixture(scope="session")
def plugins(mega_plugins):
    return mega_plugins


@pytest.fixture
def corpus(mega_corpus):
    return mega_corpus
