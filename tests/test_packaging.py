"""mega-lm as a package others depend on: the wheel ships every subpackage, its entry points
and `py.typed`, and passes `twine check`; the torch bound is the lowest torch with every API
the code uses, declared once and checked at import; and PyPI's unrelated `mega`, which
installs a top-level package of the same name, is named when it takes mega-lm's place."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import pytest

import mega
from mega import environment

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
                   check=True, timeout=300, capture_output=True)
    return next(out.glob("mega_lm-*.whl"))


@pytest.mark.slow
def test_wheel_contains_every_module_entry_point_and_py_typed(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"mega/{p.relative_to(ROOT / 'kernel')}" for p in (ROOT / "kernel").rglob("*.py")}
    expected |= {f"mega/plugins/{p.relative_to(ROOT / 'plugins')}" for p in (ROOT / "plugins").rglob("*.py")}
    assert expected - names == set()
    assert "mega/py.typed" in names  # PEP 561: type checkers read mega-lm's annotations
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "[mega.plugins]" in text and "gpt = mega.plugins.models.gpt" in text and "mega = mega.cli:main" in text
    # the start-up hook that lets `lm_eval --model mega` find mega's model, at the top of site-packages
    pth = zipfile.ZipFile(wheel).read("mega-lm-eval.pth").decode()
    assert pth.startswith("import sys; exec(") and pth.count("\n") == 1 and "LmEvalModelsHook" in pth
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert f"Requires-Dist: torch>={environment.MIN_TORCH}" in metadata
    assert "Provides-Extra: datasets" in metadata and "Provides-Extra: zstd" in metadata


@pytest.mark.slow
def test_the_wheel_passes_twine_check(wheel):
    proc = subprocess.run([sys.executable, "-m", "twine", "check", "--strict", str(wheel)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PASSED" in proc.stdout


# --- the torch bound ----------------------------------------------------------------------

def _declared_torch_bound() -> str:
    text = (ROOT / "pyproject.toml").read_text()
    bounds = re.findall(r'"torch>=([0-9.]+)"', text)
    assert len(bounds) == 1, bounds
    return bounds[0]


def test_the_torch_bound_is_the_newest_api_the_code_uses_and_is_declared_everywhere():
    newest = max((v for v, _ in environment.TORCH_APIS.values()), key=environment.version_tuple)
    assert environment.MIN_TORCH == newest  # the bound is what the APIs need, no more
    assert _declared_torch_bound() == environment.MIN_TORCH
    assert f"torch>={environment.MIN_TORCH}" in (ROOT / "README.md").read_text()


def _source_text() -> str:
    return "\n".join(p.read_text() for d in ("kernel", "plugins") for p in (ROOT / d).rglob("*.py")
                     if p.name != "environment.py")


def test_every_api_behind_the_bound_is_used_and_exists_in_this_torch():
    """The table cannot rot: each API is still used by the code, and resolves in torch."""
    import importlib

    source = _source_text()
    for api in environment.TORCH_APIS:
        module, _, attr = api.rpartition(".")
        assert re.search(rf"\b{re.escape(attr)}\b", source), f"{api} is no longer used: drop it from TORCH_APIS"
        assert hasattr(importlib.import_module(module), attr), f"{api} is missing from torch {mega.__version__}"


def test_every_torch_serialization_and_autocast_api_the_code_calls_is_in_the_table():
    """The version-sensitive families (weights_only loading, autocast queries, attention
    kernels): a new call among them must state the release that introduced it."""
    used = set(re.findall(r"torch\.serialization\.([a-z_]+)", _source_text()))
    assert {f"torch.serialization.{u}" for u in used} <= set(environment.TORCH_APIS), used
    for name in re.findall(r"torch\.(get_autocast_[a-z_]+)", _source_text()):
        assert f"torch.{name}" in environment.TORCH_APIS, name


@pytest.mark.parametrize("version, ok", [("2.13.0+cpu", True), ("2.6.0", True), ("2.6.0a0+git1234", True),
                                         ("3.0.0", True), ("2.5.1", False), ("2.3.0", False), ("1.13.1", False)])
def test_an_older_torch_is_refused_at_import_naming_both_versions(version, ok):
    if ok:
        environment.check_torch(version)
        return
    with pytest.raises(ImportError) as info:
        environment.check_torch(version)
    message = str(info.value)
    assert f"found torch {version}" in message and f"torch>={environment.MIN_TORCH}" in message
    assert "get_unsafe_globals_in_checkpoint" in message


# --- PyPI's `mega` --------------------------------------------------------------------------

def test_a_foreign_mega_package_is_named_with_both_distributions(monkeypatch):
    foreign = types.ModuleType("mega")
    foreign.__file__ = "/site-packages/mega/__init__.py"
    monkeypatch.setitem(sys.modules, "mega", foreign)
    with pytest.raises(ImportError) as info:
        environment.check_own_package()
    message = str(info.value)
    assert "/site-packages/mega/__init__.py is not mega-lm's" in message and "PyPI's unrelated `mega`" in message
    assert "pip uninstall mega mega-lm" in message
    monkeypatch.setitem(sys.modules, "mega", mega)
    environment.check_own_package()  # ours: nothing to say


# What PyPI's `mega` 0.2.11 installs (its wheel's RECORD): mega/__init__.py, which imports
# its __version__ module, mega/__version__.py, mega/mega.py and a `mega` console script.
FOREIGN_INIT = ("from .__version__ import __title__, __description__, __url__, __version__\n"
                "from .__version__ import __author__, __author_email__, __license__\n")
FOREIGN_VERSION = ("__title__ = 'mega'\n__description__ = 'Python web scraper'\n__url__ = ''\n__version__ = '0.2.11'\n"
                   "__author__ = ''\n__author_email__ = ''\n__license__ = 'MIT'\n")


def _install_foreign_mega(site: Path) -> None:
    (site / "mega").mkdir(parents=True, exist_ok=True)
    (site / "mega" / "__init__.py").write_text(FOREIGN_INIT)
    (site / "mega" / "__version__.py").write_text(FOREIGN_VERSION)
    (site / "mega" / "mega.py").write_text("def main():\n    print('scraping')\n")
    info = site / "mega-0.2.11.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mega\nVersion: 0.2.11\n")
    (info / "RECORD").write_text("")


def _install_ours(site: Path, wheel: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--upgrade", "--target",
                    str(site), str(wheel)], check=True, timeout=300, capture_output=True)


def _python_m_mega(site: Path, *args):
    env = {**os.environ, "PYTHONPATH": str(site)}
    return subprocess.run([sys.executable, "-m", "mega", *args], cwd=site.parent, env=env, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.slow
def test_with_pypis_mega_installed_last_mega_lm_stops_with_one_clear_error(tmp_path, wheel):
    site = tmp_path / "site"
    _install_ours(site, wheel)
    found = _python_m_mega(site, "--version")
    assert found.returncode == 0 and "mega 0.1.0" in found.stdout, found.stderr  # our installed copy is the one imported
    _install_foreign_mega(site)  # `pip install mega` after mega-lm: its __init__.py replaces ours
    proc = _python_m_mega(site, "plugins")
    assert proc.returncode != 0
    assert "is not mega-lm's: PyPI's unrelated `mega` distribution" in proc.stderr, proc.stderr
    assert "has no attribute" not in proc.stderr


@pytest.mark.slow
def test_with_mega_lm_installed_last_it_works_and_warns_of_the_shared_package(tmp_path, wheel):
    site = tmp_path / "site"
    _install_foreign_mega(site)
    _install_ours(site, wheel)  # `pip install mega-lm` after mega: our __init__.py replaces its
    proc = _python_m_mega(site, "plugins")
    assert proc.returncode == 0, proc.stderr
    assert "gpt" in proc.stdout
    assert "PyPI's unrelated `mega` 0.2.11 is installed in this environment too" in proc.stderr, proc.stderr


def test_the_name_clash_is_documented():
    readme = (ROOT / "README.md").read_text()
    assert "PyPI's `mega`" in readme and "python -m mega" in readme and "pip uninstall mega mega-lm" in readme
