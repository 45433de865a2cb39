"""Errors a user can act on.

Every error that is the user's to fix (a config key, a data file, a checkpoint, a plugin)
is a `MegaError`: the CLI prints its message on one line and exits with status 2 instead of
showing a traceback. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import difflib
from typing import Iterable


class MegaError(Exception):
    """Base class of errors caused by the user's input; the CLI exits 2 on these."""

    exit_code = 2


class ConfigError(MegaError):
    """A configuration problem; the message names the dotted key(s)."""


class PluginError(MegaError):
    """A plugin failed to import, registered a duplicate name, or misspelled a hook."""


class DataError(MegaError):
    """A data file is missing, empty, unreadable or malformed; the message names it."""


class CheckpointError(MegaError):
    """A checkpoint is missing, truncated or corrupt; the message names the file."""


def did_you_mean(word: str, choices: Iterable[str], prefix: str = "") -> str:
    """Return ", did you mean X?" for the closest choice (shown after `prefix`, e.g. the
    dotted path of its table), or "" when none is close."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f", did you mean {prefix}{close[0]}?" if close else ""
