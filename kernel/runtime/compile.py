"""`trainer.compile`: the training step's forward (and, through AOTAutograd, its backward)
under `torch.compile`.

"auto" compiles on CUDA, where it removes the unfused elementwise work and the autocast
casts that eager mode runs as separate kernels (docs/performance.md), and not on the CPU,
where compilation takes longer than the short runs it would speed up. Compilation happens
at the first step; when it fails (no C++ compiler, an unsupported operator, a torch bug),
the run says so in one line and continues eagerly rather than failing.
"""
from __future__ import annotations

import contextlib
import logging

import torch

log = logging.getLogger("mega")


def compile_wanted(setting, device: torch.device) -> bool:
    """`trainer.compile` (true, false or "auto") for this device."""
    if setting == "auto":
        return device.type == "cuda"
    return bool(setting)


def _compiler_error(exc: BaseException) -> bool:
    """An error of torch's compiler stack (dynamo tracing, AOTAutograd, inductor, the C++
    or Triton toolchain), not of the model: only these fall back to eager."""
    names = [c.__module__ for c in type(exc).__mro__]
    return any(n.startswith(("torch._dynamo", "torch._inductor", "torch._functorch", "triton")) for n in names)


class CompiledStep(torch.nn.Module):
    """`module` (the loss module, DDP-wrapped or not) called through torch.compile until
    compilation fails once; then eagerly, for good."""

    def __init__(self, module: torch.nn.Module, **options):
        super().__init__()
        self.module = module
        self.compiled = torch.compile(module, **options)
        self.fallen_back = False

    def forward(self, batch):
        if not self.fallen_back:
            try:
                return self.compiled(batch)
            except Exception as exc:
                if not _compiler_error(exc):
                    raise
                self.fallen_back = True
                first = (str(exc).strip().splitlines() or [""])[0][:300]
                log.warning("trainer.compile: torch.compile failed (%s: %s); continuing without compilation "
                            "(set trainer.compile=false to skip the attempt)", type(exc).__name__, first)
        return self.module(batch)

    def no_sync(self):
        """DDP's gradient-sync switch of the wrapped module (for gradient accumulation)."""
        return self.module.no_sync() if hasattr(self.module, "no_sync") else contextlib.nullcontext()
