"""Command-line overrides in the Hydra grammar the seeds use.

    key=value      the key must already exist (in the file or the schema defaults)
    +key=value     add a key that does not exist yet
    ++key=value    add or replace

Values are parsed as TOML values first (`3`, `1e-4`, `"text"`, `[1, 2]`, `true`), then with
Hydra's leniencies so seed command lines work verbatim: `True`/`False`, `null`/`None`,
bare strings, and lists of bare items such as `[1.0,/data/wiki.txt]`.
"""
from __future__ import annotations

import re
import sys
from typing import Any, Callable, List, Tuple

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from mega.errors import ConfigError, did_you_mean

_OVERRIDE = re.compile(r"^(\+\+|\+)?([A-Za-z_][\w\-]*(?:\.[A-Za-z_0-9][\w\-]*)*)=(.*)$", re.S)
_SPECIAL = {"True": True, "False": False, "true": True, "false": False, "null": None, "None": None, "~": None}


def parse_value(text: str) -> Any:
    text = text.strip()
    if text in _SPECIAL:
        return _SPECIAL[text]
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = _lenient(text)
    # '"800,100,100"' (quoted twice for the shell, as in the seed) means the inner string.
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        value = value[1:-1]
    return value


def _lenient(text: str) -> Any:
    if text.startswith("[") and text.endswith("]"):
        inner = text[1:-1].strip()
        return [parse_value(item) for item in _split_top_level(inner)] if inner else []
    return text


def _split_top_level(text: str) -> List[str]:
    items, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return items


def parse_override(arg: str) -> Tuple[str, List[str], Any]:
    """Split `[+|++]a.b.c=value` into (mode, ["a", "b", "c"], value)."""
    m = _OVERRIDE.match(arg)
    if not m:
        raise ConfigError(f"override {arg!r}: expected key=value, +key=value or ++key=value")
    return m.group(1) or "", m.group(2).split("."), parse_value(m.group(3))


def apply_overrides(raw: dict, overrides: List[str], exists: Callable[[dict, List[str]], bool],
                    keys: Callable[[dict, List[str]], List[str]] = lambda raw, path: []) -> dict:
    """Apply overrides in order to the raw config dict (in place, also returned).

    `exists(raw, path)` says whether a key exists in the file or the schema defaults;
    `keys(raw, path)` lists the keys a table may hold, for a did-you-mean on a typo.
    """
    for arg in overrides:
        mode, path, value = parse_override(arg)
        dotted = ".".join(path)
        present = exists(raw, path)
        if mode == "" and not present:
            raise ConfigError(f"{dotted}: no such key to override{_suggestion(raw, path, exists, keys)}; use +{dotted}=..."
                              f" to add it or ++{dotted}=... to add or replace")
        if mode == "+" and _get(raw, path) is not _MISSING:
            raise ConfigError(f"{dotted}: already set; use {dotted}=... or ++{dotted}=... to replace it")
        node = raw
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"{'.'.join(path[: i + 1])}: is a value, not a table, so {dotted} cannot be set")
            node = child
        node[path[-1]] = value
    return raw


_MISSING = object()


def _get(raw: dict, path: List[str]) -> Any:
    node: Any = raw
    for part in path:
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _suggestion(raw: dict, path: List[str], exists, keys) -> str:
    """", did you mean a.b.c?" for the first part of `path` that does not exist."""
    depth = next(i for i in range(len(path)) if not exists(raw, path[: i + 1]))
    return did_you_mean(path[depth], keys(raw, path[:depth]), prefix="".join(p + "." for p in path[:depth]))
