"""mega's own tests use the same helpers a plugin author gets from `mega.testing` (import
them from there). `plugins` and `corpus` are this suite's short names for the
`mega_plugins` and `mega_corpus` fixtures of mega's pytest plugin.
"""
from __future__ import annotations

import pytest

# The fixtures are normally loaded by the `pytest11` entry point; importing them here keeps
# this suite working in an environment installed before that entry point existed.
from mega.testing.pytest_plugin import mega_corpus, mega_device, mega_experiment, mega_plugin, mega_plugins  # noqa: F401


@pytest.fixture(scope="session")
def plugins(mega_plugins):
    return mega_plugins


@pytest.fixture
def corpus(mega_corpus):
    return mega_corpus


_DISTRIBUTED_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                     "GROUP_RANK", "TORCHELASTIC_RUN_ID")


@pytest.fixture(autouse=True)
def _no_leaked_rendezvous():
    """A test that leaves RANK / WORLD_SIZE / MASTER_* in os.environ would make every later
    in-process run of the session wait for peers that never come: put them back."""
    import os

    before = {k: os.environ.get(k) for k in _DISTRIBUTED_VARS}
    yield
    for k, v in before.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
