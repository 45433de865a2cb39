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
import re

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


# The step after which `mega run` logs what compilation did: by then the memory of a model
# that carries one (Transformer-XL) is full and every shape the run will see has been seen.
REPORT_STEP = 3


def _dynamo_counts() -> tuple:
    """(graphs compiled, {graph-break reason: count}) so far in this process, from
    torch._dynamo's own counters. A break is filed with its reason under "graph_break" or
    "unimplemented" (by torch version); some (a data-dependent guard, e.g. a dict looked up
    with a tensor's value) only leave the function dynamo resumed after it ("resumes"),
    counted here as `resumed in <function> at line <n>` when no reason accounts for them."""
    from torch._dynamo.utils import counters

    breaks: dict = {}
    for kind in ("graph_break", "unimplemented"):
        for reason, n in counters.get(kind, {}).items():
            first = (str(reason).strip().splitlines() or ["?"])[0][:160]
            breaks[first] = breaks.get(first, 0) + n
    resumed = {}
    for name, n in counters.get("resumes", {}).items():
        m = re.match(r"torch_dynamo_resume_in_(.+)_at_(\d+)$", str(name))
        resumed[f"resumed in {m.group(1)} at line {m.group(2)}" if m else str(name)] = n
    if sum(resumed.values()) > sum(breaks.values()):
        breaks.update(resumed)
    return counters["stats"]["unique_graphs"], breaks


class CompileStats:
    """What torch.compile did during a run, from torch._dynamo's counters: graphs compiled by
    the end of the first step and after it (recompilations: a guard failed, e.g. a new
    shape), and graph breaks with their reasons. A step that compiles into one graph
    (forward; AOTAutograd derives its backward) shows 1 graph, 0 breaks, 0 recompilations."""

    def __init__(self):
        self._graphs0, self._breaks0 = _dynamo_counts()
        self.first_step_graphs = None
        self._reported_graphs = None

    def counts(self) -> tuple:
        graphs, breaks = _dynamo_counts()
        new = {r: n - self._breaks0.get(r, 0) for r, n in breaks.items() if n > self._breaks0.get(r, 0)}
        return graphs - self._graphs0, new

    def after_step(self, step: int, last: bool = False):
        """The line to log after `step` (None: nothing new): the summary at REPORT_STEP (or
        at the last step of a shorter run), then a line for each later recompilation."""
        graphs, breaks = self.counts()
        if self.first_step_graphs is None:
            self.first_step_graphs = graphs
        if self._reported_graphs is None:
            if step < REPORT_STEP and not last:
                return None
            self._reported_graphs = graphs
            return self.summary(step)
        if graphs > self._reported_graphs:
            self._reported_graphs = graphs
            return f"trainer.compile: recompiled at step {step} ({self.summary(step)})"
        return None

    def summary(self, step: int) -> str:
        graphs, breaks = self.counts()
        reasons = "; ".join(f"{n} x {r}" for r, n in sorted(breaks.items(), key=lambda kv: -kv[1]))
        return (f"trainer.compile: after step {step}: {graphs} graph(s), {sum(breaks.values())} graph break(s)"
                f"{' (' + reasons + ')' if reasons else ''}, {graphs - self.first_step_graphs} recompilation(s)"
                f" after step 1")


def _data_dependent_ops_traced():
    """Trace `nonzero`, boolean-mask indexing and `.item()` into the graph (their sizes
    become symbols) instead of breaking it in two: BERT's masked-LM rows and
    Transformer-XL's adaptive-softmax buckets stay inside one graph. They still read a
    size on the host; that sync is counted by tests/kernel/test_host_syncs.py."""
    import torch._dynamo

    return torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True, capture_scalar_outputs=True)


class CompiledStep(torch.nn.Module):
    """`module` (the loss module, DDP-wrapped or not) called through torch.compile until
    compilation fails once; then eagerly, for good. `stats` counts its graphs, graph breaks
    and recompilations (`mega run` logs them after REPORT_STEP)."""

    def __init__(self, module: torch.nn.Module, **options):
        super().__init__()
        self.module = module
        self.compiled = torch.compile(module, **options)
        self.fallen_back = False
        self.stats = CompileStats()

    def after_step(self, step: int, last: bool = False) -> None:
        """Log the compile summary (or a later recompilation) after training step `step`."""
        if not self.fallen_back:
            line = self.stats.after_step(step, last)
            if line:
                log.info("%s", line)

    def forward(self, batch):
        if not self.fallen_back:
            try:
                with _data_dependent_ops_traced():
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
