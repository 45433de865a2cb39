"""Makes `lm_eval --model mega` work with lm-evaluation-harness's own command line.

lm-eval finds a model only in its registry, which `lm_eval.models` fills when it is
imported, and it discovers no models of other packages (no entry points). mega-lm
therefore installs `mega-lm-eval.pth` at the top of site-packages; Python runs it at
start-up. It holds this file's code (setup.py writes it there, then `install()`), run in a
namespace of its own, not imported: neither `mega` nor a top-level module is imported at
start-up (pytest would otherwise warn that a module of its plugin mega-lm came in early),
and it imports nothing (no lm-eval, torch or mega), so every other program pays nothing.

The hook is a meta-path finder answering for `lm_eval.models` only: after that module ran,
it registers the name `mega`, lazily as lm-eval registers its own models, so
`mega.plugins.harness.lm_eval_model:MegaLM` is imported only when `--model mega` is asked
for. Importing that module directly (the Python API) registers it as well.
"""
from __future__ import annotations

import sys

MODELS_MODULE = "lm_eval.models"
MEGA_MODEL = "mega.plugins.harness.lm_eval_model:MegaLM"


class _Registering:
    """The loader of `lm_eval.models`, registering `mega` after the module ran."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        try:
            registry = sys.modules["lm_eval.api.registry"].model_registry
            if "mega" not in registry:
                registry.register("mega", target=MEGA_MODEL)
            module.MODEL_MAPPING.setdefault("mega", MEGA_MODEL)
        except Exception:  # pragma: no cover - another lm-eval layout: lm-eval must still work
            pass

    def __getattr__(self, name):
        return getattr(self.loader, name)


class LmEvalModelsHook:
    """A meta-path finder that answers for `lm_eval.models` only."""

    mega_lm_eval_hook = True

    def find_spec(self, name, path=None, target=None):
        if name != MODELS_MODULE:
            return None
        from importlib.machinery import PathFinder

        spec = PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _Registering(spec.loader)
        return spec


def install() -> None:
    """Put the hook first on sys.meta_path, once (site may run a .pth twice, each time
    defining the class anew, hence the marker rather than isinstance)."""
    if not any(getattr(f, "mega_lm_eval_hook", False) for f in sys.meta_path):
        sys.meta_path.insert(0, LmEvalModelsHook())
