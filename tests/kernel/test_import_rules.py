"""Who may import whom, as tests (docs/architecture.md has the picture).

* The kernel never imports a plugin: first-party plugins have no privilege a third-party
  one lacks.
* The kernel is layered from the ground up; a module imports only its own layer or those
  below (lazily inside a function too: a lazy import is still a dependency).
* A plugin imports only the declared plugin API (`mega.PLUGIN_API`), never training, the
  commands or the plugin manager, as pytest's plugins use `pytest`, not `_pytest`.
"""
from __future__ import annotations

from typing import Optional

import pytest

import mega
from tests.helpers.imports import ROOT, imports, is_module as _is_module, module_name, within as _within


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


def layer_of(module: str) -> Optional[int]:
    for i, names in enumerate(LAYERS):
        if any(_within(module, n) for n in names):
            return i
    return None


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


def test_no_test_file_imports_another():
    """Shared test code lives in tests/helpers (or a wing's conftest), never in another
    test file: a test module is not an API, and importing one runs its module-level setup."""
    wrong = [f"{path.relative_to(ROOT)}:{line} imports {name}"
             for path in (ROOT / "tests").rglob("test_*.py") for name, line in imports(path)
             if name.startswith("tests.") and name.rsplit(".", 1)[-1].startswith("test_")]
    assert not wrong, "\n".join(wrong)


def _test_tree_imports(path):
    """(module, line) for every `import tests...` / `from tests... import name` in a file,
    lazy ones included; `from tests import x` yields tests.x."""
    import ast

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from ((a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "tests")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "tests":
            if node.module == "tests":
                yield from ((f"tests.{a.name}", node.lineno) for a in node.names)
            else:
                yield node.module, node.lineno


def test_shared_test_code_is_imported_from_tests_helpers_and_exists():
    """Every import of the test tree's own code names a module of tests/helpers that exists
    (a lazy `from tests import old_module` left behind by a move fails here, not at run time)."""
    wrong = []
    for path in (ROOT / "tests").rglob("*.py"):
        for name, line in _test_tree_imports(path):
            parts = name.split(".")
            target = ROOT.joinpath(*parts)
            exists = target.with_suffix(".py").is_file() or (target / "__init__.py").is_file()
            if parts[:2] != ["tests", "helpers"] or not exists:
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    assert not wrong, "\n".join(wrong)
