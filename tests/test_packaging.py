"""A non-editable install ships every subpackage: build the wheel and compare its contents
with the source tree (editable installs would hide a forgotten package)."""
from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_contains_every_module_and_entry_point(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
                   check=True, timeout=300, capture_output=True)
    wheel = next(tmp_path.glob("mega_lm-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"mega/{p.relative_to(ROOT / 'kernel')}" for p in (ROOT / "kernel").rglob("*.py")}
    expected |= {f"mega/plugins/{p.relative_to(ROOT / 'plugins')}" for p in (ROOT / "plugins").rglob("*.py")}
    assert expected - names == set()
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "[mega.plugins]" in text and "gpt = mega.plugins.models.gpt" in text and "mega = mega.cli:main" in text
    # the start-up hook that lets `lm_eval --model mega` find mega's model, at the top of site-packages
    pth = zipfile.ZipFile(wheel).read("mega-lm-eval.pth").decode()
    assert pth.startswith("import sys; exec(") and pth.count("\n") == 1 and "LmEvalModelsHook" in pth
