"""What mega-lm needs of the environment it is imported in, checked when `mega` is imported,
so a wrong environment fails with one clear message instead of an AttributeError deep in
a run.

* torch >= MIN_TORCH. The bound is the newest of the versions that introduced the torch
  APIs mega relies on (`TORCH_APIS`, checked against the code and against torch by
  tests/test_packaging.py); pyproject.toml declares the same bound.
* The `mega` package is mega-lm's own. PyPI's unrelated `mega` (0.2.x, a web scraper)
  installs a top-level package of the same name: `mega/__init__.py`, `mega/__version__.py`,
  `mega/mega.py`, and a `mega` console script. In one environment the one installed last
  overwrites the other's `__init__.py` and `mega` command, and uninstalling either deletes
  the shared `__init__.py`. When mega-lm's own modules find a foreign `mega/__init__.py`
  they stop with `check_own_package`'s error; when PyPI's `mega` is merely installed
  beside an intact mega-lm, `foreign_mega_distribution` says so (the command line warns).
"""
from __future__ import annotations

import re
import sys
from typing import Optional

MIN_TORCH = "2.6"

# The torch APIs that set the bound: each with the release that introduced it (read from
# that release's sources) and where mega uses it.
TORCH_APIS = {
    "torch.serialization.safe_globals": ("2.5", "reading Megatron-LM's `args` with weights_only=True"),
    "torch.serialization.get_unsafe_globals_in_checkpoint": ("2.6", "naming the classes a refused checkpoint holds,"
                                                             " and loading Megatron-LM's own classes as stand-ins"),
    "torch.serialization.add_safe_globals": ("2.4", "allow-listing Megatron-LM's classes while reading its files"),
    "torch.serialization.get_safe_globals": ("2.4", "restoring the allow-list afterwards"),
    "torch.serialization.clear_safe_globals": ("2.4", "restoring the allow-list afterwards"),
    "torch.get_autocast_dtype": ("2.4", "the fused output layer's loss under autocast"),
    "torch.nn.attention.sdpa_kernel": ("2.3", "model.attention_backend"),
}

FOREIGN_MEGA = "mega"  # PyPI's unrelated distribution that ships a top-level `mega` package


def version_tuple(version: str) -> tuple:
    """(major, minor) of a version string such as "2.13.0+cpu" or "2.6.0a0+git1234"."""
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def check_torch(version: Optional[str] = None) -> None:
    """An ImportError naming the installed and the needed torch when torch is too old;
    nothing when torch's version cannot be read (a source build without metadata)."""
    if version is None:
        from importlib import metadata

        try:
            version = metadata.version("torch")
        except metadata.PackageNotFoundError:
            return
    if version_tuple(version) < version_tuple(MIN_TORCH):
        newest = max(TORCH_APIS.items(), key=lambda kv: version_tuple(kv[1][0]))
        raise ImportError(
            f"mega-lm needs torch>={MIN_TORCH}, found torch {version}: it uses {newest[0]} (new in torch {newest[1][0]},"
            f" for {newest[1][1]}); pip install 'torch>={MIN_TORCH}'")


def clash_message(where: str) -> str:
    return (f"the `mega` package imported from {where} is not mega-lm's: PyPI's unrelated `mega` distribution (a web"
            " scraper, 0.2.x) installs a top-level package of the same name and replaced mega-lm's mega/__init__.py. The"
            " two cannot share an environment: `pip uninstall mega mega-lm` and `pip install mega-lm` again, or put"
            " them in separate virtual environments")


def check_own_package() -> None:
    """An ImportError naming both distributions when `mega` is not mega-lm's package
    (PyPI's `mega` overwrote its `__init__.py`)."""
    pkg = sys.modules.get("mega")
    if pkg is not None and not getattr(pkg, "__mega_lm__", False):
        raise ImportError(clash_message(getattr(pkg, "__file__", None) or "?"))


def foreign_mega_distribution() -> Optional[str]:
    """The version of PyPI's `mega` when it is installed beside mega-lm (None: it is not)."""
    from importlib import metadata

    try:
        return metadata.version(FOREIGN_MEGA)
    except metadata.PackageNotFoundError:
        return None
