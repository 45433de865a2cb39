"""Who may import whom, as tests (docs/architecture.md has the picture).

* The kernel never imports a plugin: first-party plugins have no privilege a third-party
  one lacks.
* The kernel is layered from the ground up; a module imports only its own layer or those
  below (lazily inside a function too: a lazy import is still a dependency).
* A plugin imports only the declared plugin API (`mega.PLUGIN_API`), never training, the
  commands or the plugin manager, as pytest's plugins use `pytest`, not `_pytest`.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterator, Optional, Tuple

import pytest

import mega

ROOT = Path(__file__).resolve().parents[1]

# From the ground up; the façade (`mega/__init__`) and the plugin-author kit
# (`mega.testing`) sit outside the layers: they may use any of them.
LAYERS = (
    ("mega.errors", "mega.protocols", "mega.hookspecs", "mega.documents", "mega.environment"),
    ("mega.runtime",),
    ("mega.registry", "mega.plugin_manager"),
    ("mega.config",),
    ("mega.checkpoint",),
    ("mega.training",),
    ("mega.cli", "mega.evaluation", "mega.inference", "mega.plan", "mega.preprocess", "mega.__main__"),
)


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def layer_of(module: str) -> Optional[int]:
    for i, names in enumerate(LAYERS):
        if any(_within(module, n) for n in names):
            return i
    return None


def module_name(path: Path) -> str:
    """The import name of a file under kernel/ (mega) or plugins/ (mega.plugins)."""
    rel = path.relative_to(ROOT)
    top = {"kernel": ["mega"], "plugins": ["mega", "plugins"]}[rel.parts[0]]
    parts = [*top, *rel.with_suffix("").parts[1:]]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
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
                yield (sub if _is_module(sub) else node.module), node.lineno


def test_a_submodule_imported_from_its_package_is_seen():
    """`from mega import training` is an import of mega.training, not of the façade."""
    assert _is_module("mega.training") and _is_module("mega.checkpoint.store") and _is_module("mega.plugins.models.gpt")
    assert not _is_module("mega.hookimpl") and not _is_module("mega.checkpoint.restore_from")


def test_the_layers_are_known():
    """Every kernel module is in a layer (or is the façade or the test kit), so a new module
    cannot escape the rule by not being listed."""
    unplaced = [module_name(p) for p in (ROOT / "kernel").rglob("*.py")
                if layer_of(module_name(p)) is None and module_name(p) != "mega" and not _within(module_name(p), "mega.testing")]
    assert not unplaced


def test_the_kernel_never_imports_first_party_plugins():
    for path in (ROOT / "kernel").rglob("*.py"):
        for name, line in imports(path):
            assert not _within(name, "mega.plugins"), f"{path.relative_to(ROOT)}:{line} imports {name}"


def test_kernel_modules_import_only_their_own_layer_or_below():
    wrong = []
    for path in (ROOT / "kernel").rglob("*.py"):
        here = layer_of(module_name(path))
        if here is None:
            continue
        for name, line in imports(path):
            there = layer_of(name) if _within(name, "mega") else None
            if there is not None and there > here:
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {name} (layer {there} above {here})")
    assert not wrong, "\n".join(wrong)


def _plugin_files():
    yield from (ROOT / "plugins").rglob("*.py")
    yield from (ROOT / "contrib").rglob("*.py")


def allowed_for_plugins(name: str) -> bool:
    return not _within(name, "mega") or _within(name, "mega.plugins") or name == "mega" or any(
        _within(name, api) for api in mega.PLUGIN_API if api != "mega")


def test_plugins_import_only_the_plugin_api():
    wrong = [f"{path.relative_to(ROOT)}:{line} imports {name}"
             for path in _plugin_files() for name, line in imports(path) if not allowed_for_plugins(name)]
    assert not wrong, "\n".join(wrong) + f"\n(the plugin API: {', '.join(mega.PLUGIN_API)})"


@pytest.mark.parametrize("name, ok", [("mega", True), ("mega.errors", True), ("mega.runtime.parallel", True),
                                      ("mega.checkpoint.store", True), ("mega.training.run", False),
                                      ("mega.plugin_manager", False), ("mega.cli", False), ("mega.inference", False),
                                      ("mega.plugins.models.gpt", True), ("torch", True), ("megatron", True)])
def test_the_plugin_rule_itself(name, ok):
    """The checker tells the API from the rest (so the rule above cannot pass by accident)."""
    assert allowed_for_plugins(name) is ok


def test_the_plugin_api_is_documented():
    text = (ROOT / "docs" / "plugins.md").read_text()
    for api in mega.PLUGIN_API:
        assert f"`{api}`" in text, f"docs/plugins.md does not name {api} in the plugin API"
