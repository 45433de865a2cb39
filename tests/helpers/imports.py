"""Reading the imports of this tree's files (the import-rule and structure tests)."""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterator, Tuple


ROOT = Path(__file__).resolve().parents[2]


def within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def module_name(path: Path) -> str:
    """The import name of a file under kernel/ (mega) or plugins/ (mega.plugins)."""
    rel = path.relative_to(ROOT)
    top = {"kernel": ["mega"], "plugins": ["mega", "plugins"]}[rel.parts[0]]
    parts = [*top, *rel.with_suffix("").parts[1:]]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    """Whether a dotted mega name is a module or package of this tree (not an attribute)."""
    parts = name.split(".")
    if parts[0] != "mega":
        return False
    base = ROOT / "plugins" if parts[1:2] == ["plugins"] else ROOT / "kernel"
    rel = parts[2:] if parts[1:2] == ["plugins"] else parts[1:]
    target = base.joinpath(*rel) if rel else base
    return target.with_suffix(".py").is_file() or (target / "__init__.py").is_file()


def imports(path: Path) -> Iterator[Tuple[str, int]]:
    """(imported module, line) for every import in a file, at any depth. For `from X import
    Y` it is X.Y when that is a module of this tree (`from mega import trained_files`),
    else X."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                yield (sub if is_module(sub) else node.module), node.lineno
