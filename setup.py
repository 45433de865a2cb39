"""Computes the package list so that `pip install .` ships every subpackage, and installs
`mega-lm-eval.pth` (the code of plugins/harness/startup.py: it makes `lm_eval --model mega` work).

A hand-written list silently drops new subpackages from the wheel while editable installs
keep working; walking the two source roots cannot forget one.
"""
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

packages = ["mega"] + [f"mega.{p}" for p in find_packages("kernel")]
packages += ["mega.plugins"] + [f"mega.plugins.{p}" for p in find_packages("plugins")]

PTH = "mega-lm-eval.pth"


def pth_line(source: str) -> str:
    """One .pth line (site runs lines that start with `import`) that runs `source` in a
    namespace of its own, then its install()."""
    code = source + "\ninstall()\n"
    return f"import sys; exec(compile({code!r}, {PTH!r}, 'exec'), {{'__name__': 'mega_lm_eval_startup'}})"


class BuildPyWithPth(build_py):
    """build_py, plus the .pth file at the top of site-packages: in a wheel it goes into the
    build folder beside the packages; in an editable install (whose wheel holds no built
    files) straight into the wheel being assembled, which is the `install` command's
    install_lib there."""

    def run(self):
        super().run()
        source = Path(__file__).resolve().parent / "plugins" / "harness" / "startup.py"
        if getattr(self, "editable_mode", False):
            target = Path(self.get_finalized_command("install").install_lib)
        else:
            target = Path(self.build_lib)
        target.mkdir(parents=True, exist_ok=True)
        (target / PTH).write_text(pth_line(source.read_text(encoding="utf-8")) + "\n", encoding="utf-8")

    def get_outputs(self, include_bytecode=True):
        outputs = super().get_outputs(include_bytecode)
        return outputs if getattr(self, "editable_mode", False) else [*outputs, str(Path(self.build_lib) / PTH)]


setup(packages=packages, cmdclass={"build_py": BuildPyWithPth})
